"""grpo_step and the loop: exact first-pass ratio, route replay, the sampling-mask switch, exact resume."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.model import functional
from dsa_jax.model.config import tiny
from dsa_jax.rl import get_task, grpo_step, loop
from dsa_jax.rl.grpo_loss import k3_kl
from dsa_jax.rl.rollout import draw_prompts, rollout
from dsa_jax.sampling import SamplingConfig

TOK = ByteTokenizer()
CFG = tiny().replace(vocab_size=TOK.vocab_size, num_mtp_layers=0, num_layers=2)  # layer 1 is MoE
TASK = get_task("sort", min_len=3, max_len=4)
SAMPLING = SamplingConfig(max_new_tokens=5, top_p=0.9, k_max=32, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
LOOP = loop.LoopConfig(steps=2, num_prompts=2, group_size=3, prompt_width=10, checkpoint_every=1)
GRPO = grpo_step.GRPOConfig(beta=0.1)


@functools.lru_cache(maxsize=None)
def _params():
  return jax.jit(functools.partial(functional.init, CFG, seed=0))()


@functools.lru_cache(maxsize=None)
def _batch():
  prompts, answers = draw_prompts(TASK, np.random.default_rng(0), LOOP.num_prompts)
  batch, _ = rollout(CFG, _params(), TASK, TOK, prompts, answers, group_size=LOOP.group_size,
                     prompt_width=LOOP.prompt_width, sampling=SAMPLING, rng=jax.random.key(0))
  # Distinct rewards so the advantages are not all zero.
  return dataclasses.replace(batch, advantages=jnp.asarray([0.5, -0.5, 0.2, -0.1, 0.3, -0.4], jnp.float32))


def test_first_pass_ratio_is_exactly_one_and_loss_is_clip_free():
  batch = grpo_step.score(CFG, GRPO, _params(), _params(), _batch())
  state = grpo_step.init_state(_params(), loop.optimizer(LOOP.learning_rate), 0)
  _, metrics = grpo_step.make_step(CFG, GRPO, loop.optimizer(LOOP.learning_rate))(state, batch)
  assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
  assert float(metrics["clip_frac"]) == 0.0
  logp, _ = grpo_step.policy_logp(CFG, GRPO, _params(), batch)
  mask = np.asarray(batch.mask[:, 1:], np.float32)
  kl = np.asarray(k3_kl(logp, logp, batch.ref_logp)) * mask
  per_seq = (np.asarray(batch.advantages)[:, None] * mask - GRPO.beta * kl).sum(-1) / mask.sum(-1)
  np.testing.assert_allclose(float(metrics["loss"]), -per_seq.mean(), rtol=1e-5, atol=1e-6)


def test_replayed_routes_are_used_verbatim():
  batch = _batch()
  rng = np.random.default_rng(0)
  forced = {i: jnp.asarray(np.stack([rng.permutation(CFG.moe.num_experts)[:CFG.moe.experts_per_token]
                                     for _ in range(e.shape[0] * e.shape[1])]).reshape(e.shape), jnp.int32)
            for i, e in batch.experts.items()}
  out = functional.apply(CFG, _params(), batch.tokens, positions=batch.positions, segment_ids=batch.segment_ids,
                         forced_experts=forced)
  for i, e in forced.items():
    np.testing.assert_array_equal(np.asarray(out.layer_aux[i].moe.experts), np.asarray(e))
  replayed = dataclasses.replace(batch, experts=forced)
  _, own_stats = grpo_step.policy_logp(CFG, GRPO, _params(), batch)
  logp_forced, forced_stats = grpo_step.policy_logp(CFG, GRPO, _params(), replayed)
  logp_free, _ = grpo_step.policy_logp(CFG, dataclasses.replace(GRPO, keep_routing=False), _params(), replayed)
  assert float(own_stats["route_agreement"]) == 1.0 and float(forced_stats["route_agreement"]) < 0.9
  gen = np.asarray(batch.mask[:, 1:]) == 1
  assert np.abs(np.asarray(logp_forced - logp_free))[gen].max() > 1e-4  # the forced routes changed the forward
  logp_own, _ = grpo_step.policy_logp(CFG, GRPO, _params(), batch)
  chex.assert_trees_all_close(np.asarray(logp_free)[gen], np.asarray(logp_own)[gen], atol=1e-5)


def test_keep_sampling_mask_renormalises_over_the_kept_set():
  batch = _batch()
  kept, _ = grpo_step.policy_logp(CFG, GRPO, _params(), batch)
  full, _ = grpo_step.policy_logp(CFG, dataclasses.replace(GRPO, keep_sampling_mask=False), _params(), batch)
  gen = np.asarray(batch.mask[:, 1:]) == 1
  assert (np.asarray(kept)[gen] >= np.asarray(full)[gen] - 1e-6).all()
  chex.assert_trees_all_close(np.asarray(kept)[gen], np.asarray(batch.sampler_logp[:, 1:])[gen], atol=1e-5)


def test_resume_is_exact(tmp_path):
  train = functools.partial(loop.train, CFG, gcfg=GRPO, sampling=SAMPLING, task=TASK, tokenizer=TOK)
  fresh = lambda: grpo_step.init_state(_params(), loop.optimizer(LOOP.learning_rate), 0)
  straight, history = train(LOOP, state=fresh())
  train(dataclasses.replace(LOOP, steps=1), state=fresh(), run_dir=str(tmp_path))
  resumed, resumed_history = train(LOOP, state=fresh(), run_dir=str(tmp_path))
  assert [m["step"] for m in resumed_history] == [1, 2]  # the whole run, read back from metrics.jsonl
  assert resumed_history[1]["reward"] == history[1]["reward"]
  _, again = train(LOOP, state=fresh(), run_dir=str(tmp_path))  # nothing left to run: still the whole curve
  assert again == resumed_history
  chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(straight))
