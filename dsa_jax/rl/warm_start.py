"""A short supervised warm start on a verifiable task, before GRPO (allowed by issue 7's demonstration).

DeepSeek-V3.2 §3 starts RL from a fine-tuned model; on a tiny random model we do the same in miniature:
teacher-forced cross-entropy on "prompt answer EOS" sequences, laid out exactly as the sampler lays out its
rollouts (left padding, `sampling.train_layout`), with the loss on the answer and EOS only.

The indexer learns from its own loss only (DeepSeek-V3.2 §2.1.1: its input is detached and its top-k selection
gives the LM loss no path into it), so with `indexer_kl_weight` > 0 the warm start also trains it with the
dense-attention KL of the paper's indexer warm-up (`training.losses.indexer_kl`). Without it the top-k keys come
from a random indexer and the sparse model learns sorting much more slowly (docs/reports/grpo_demo.md); the default 0
keeps earlier studies (`experiments.grpo_mismatch`, notebook 04) as they were measured.

It has its own step rather than a stage of `training.train_step`: here the LM loss runs with sparse attention
while the indexer learns the dense KL of a second, dense forward pass, under plain Adam; the sparse stage
pairs sparse attention with the sparse KL, and the stages use AdamW with clipping and a warm-up schedule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig
from dsa_jax.rl.rewards import Task
from dsa_jax.rl.rollout import draw_prompts
from dsa_jax.sampling import left_pad, train_layout
from dsa_jax.training import losses


def supervised_batch(task: Task, tokenizer: Tokenizer, rng: np.random.Generator, size: int, prompt_width: int,
                     completion_width: int) -> dict[str, jax.Array]:
  """tokens/positions/segment_ids/loss_mask [size, prompt_width + completion_width] of correct answers."""
  prompts, answers = draw_prompts(task, rng, size)
  prompt_ids, lengths = left_pad([tokenizer.encode(p) for p in prompts], prompt_width, tokenizer.pad_id)
  completions = [tokenizer.encode(a) + [tokenizer.eos_id] for a in answers]
  if max(len(c) for c in completions) > completion_width:
    raise ValueError(f"completion_width={completion_width} is invalid; allowed: >= answer length + 1.")
  pad = lambda c, v: c + [v] * (completion_width - len(c))
  completion_ids = jnp.asarray([pad(c, tokenizer.pad_id) for c in completions], jnp.int32)
  loss_mask = jnp.asarray([pad([1] * len(c), 0) for c in completions], jnp.int32)
  positions, segments = train_layout(lengths, prompt_width, prompt_width + completion_width)
  return {"tokens": jnp.concatenate([prompt_ids, completion_ids], 1), "positions": positions,
          "segment_ids": segments, "loss_mask": jnp.concatenate([jnp.zeros_like(prompt_ids), loss_mask], 1)}


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "indexer_kl_weight"), donate_argnums=(1, 2))
def _sft_step(cfg: ModelConfig, params: nnx.State, opt_state, batch, optimizer, indexer_kl_weight: float):
  where = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])

  def loss_fn(p):
    logits = functional.apply(cfg, p, batch["tokens"], **where).logits[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    loss = (nll * mask).sum() / mask.sum()
    if indexer_kl_weight > 0:  # gradients of this term reach the indexer only
      dense = functional.apply(cfg, p, batch["tokens"], attention="dense", mla_mode="mqa", **where)
      loss += indexer_kl_weight * losses.indexer_kl(cfg, dense.layer_aux, batch["positions"], batch["segment_ids"],
                                                    losses.LossConfig(), sparse=False)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def warm_start(cfg: ModelConfig, params: nnx.State, task: Task, tokenizer: Tokenizer, *, steps: int,
               batch_size: int, learning_rate: float, prompt_width: int, completion_width: int,
               seed: int, indexer_kl_weight: float = 0.0) -> tuple[nnx.State, list[float]]:
  """`steps` Adam updates of teacher-forced cross-entropy plus `indexer_kl_weight` times the indexer's dense KL
  -> (params, losses)."""
  optimizer = optax.adam(learning_rate)
  opt_state, rng, losses = optimizer.init(params), np.random.default_rng(seed), []
  for _ in range(steps):
    batch = supervised_batch(task, tokenizer, rng, batch_size, prompt_width, completion_width)
    params, opt_state, loss = _sft_step(cfg, params, opt_state, batch, optimizer, indexer_kl_weight)
    losses.append(float(loss))
  return params, losses
