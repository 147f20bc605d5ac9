"""Batched generation: kept sets, log-probs and experts agree with the full forward; EOS and max-length stops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional
from dsa_jax.model.config import tiny
from dsa_jax.sampling.sampling_mask import kept_log_softmax
from dsa_jax.sampling import SamplingConfig, full_tokens, generate, left_pad, train_layout

CFG = tiny().replace(num_mtp_layers=0)
PROMPTS = [[5, 17, 9], [33, 2, 41, 7, 8, 100], [3]]
N = 12  # beyond index_topk = 8


@functools.lru_cache(maxsize=None)
def _params():
  return jax.jit(functools.partial(functional.init, CFG, seed=1))()


def _sample(sampling, seed=0):
  ids, lengths = left_pad(PROMPTS, 6, 0)
  return generate(CFG, _params(), ids, lengths, jax.random.key(seed), sampling)


def test_tokens_in_kept_set_and_logprobs_match_forward():
  sampling = SamplingConfig(max_new_tokens=N, temperature=0.8, top_p=0.9, top_k=20, k_max=32, eos_id=-1)
  out = _sample(sampling)
  chex.assert_shape([out.tokens, out.logprobs, out.mask], (3, N))
  chex.assert_shape(out.kept_ids, (3, N, 32))
  assert (out.kept_ids == out.tokens[..., None]).any(-1).all()
  assert ((out.kept_ids >= 0).sum(-1) <= 20).all()
  assert int(out.mask.sum()) == 3 * N  # no EOS: every sequence runs to max length
  # The trainer's view: one forward over [prompt | completion], routes replayed, kept sets applied.
  seq = full_tokens(out)
  positions, segments = train_layout(out.prompt_lengths, 6, 6 + N)
  fwd = functional.apply(CFG, _params(), seq, positions=positions, segment_ids=segments, forced_experts=out.experts)
  logp = kept_log_softmax(fwd.logits[:, 5:-1] / 0.8, out.kept_ids, out.tokens)
  chex.assert_trees_all_close(logp, out.logprobs, atol=1e-4)
  own = functional.apply(CFG, _params(), seq, positions=positions, segment_ids=segments)
  for i, experts in out.experts.items():  # fp32 sampler: its routes are the trainer's own routes
    real = np.asarray(segments) == 0
    np.testing.assert_array_equal(np.asarray(experts)[real], np.asarray(own.layer_aux[i].moe.experts)[real])


def test_eos_and_max_length_stops():
  greedy = SamplingConfig(max_new_tokens=N, top_k=1, k_max=1, eos_id=-1, pad_id=0)
  free = np.asarray(_sample(greedy).tokens)
  eos = int(free[0, 3])
  stop = int(np.argmax(free[0] == eos))  # first occurrence, <= 3
  out = _sample(SamplingConfig(max_new_tokens=N, top_k=1, k_max=1, eos_id=eos, pad_id=0))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  np.testing.assert_array_equal(mask[0], np.arange(N) <= stop)
  np.testing.assert_array_equal(tokens[0, :stop + 1], free[0, :stop + 1])
  assert (tokens[0, stop + 1:] == 0).all() and (np.asarray(out.logprobs)[0, stop + 1:] == 0).all()
  assert (np.asarray(out.kept_ids)[0, stop + 1:] == -1).all()
  for b in (1, 2):
    hit = np.flatnonzero(free[b] == eos)
    assert int(out.lengths[b]) == (hit[0] + 1 if hit.size else N)
  np.testing.assert_array_equal(np.asarray(out.logprobs)[mask == 1], 0.0)  # greedy: log 1


def test_temperature_zero_is_greedy():
  """Temperature 0 takes the argmax at every step (whatever top_p/top_k say), with log μ = 0."""
  out = _sample(SamplingConfig(max_new_tokens=N, temperature=0.0, top_p=0.5, k_max=32, eos_id=-1), seed=3)
  seq = full_tokens(out)
  positions, segments = train_layout(out.prompt_lengths, 6, 6 + N)
  logits = functional.forward(CFG, _params(), seq, positions=positions, segment_ids=segments)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(logits[:, 5:-1].argmax(-1)))
  assert (np.asarray(out.logprobs) == 0).all()
  assert ((np.asarray(out.kept_ids) >= 0).sum(-1) == 1).all()
  with pytest.raises(ValueError, match=r"temperature=-1.0 .*>= 0"):
    SamplingConfig(temperature=-1.0)


@pytest.mark.parametrize("change, message", [
    (lambda ids, n: (ids.at[1, 4].set(CFG.vocab_size), n), rf"prompt_tokens\[1, 4\]={CFG.vocab_size} is outside the "
                                                          rf"vocabulary; allowed: 0 <= value < {CFG.vocab_size}"),
    (lambda ids, n: (ids.at[0, 5].set(-3), n), r"prompt_tokens\[0, 5\]=-3 is outside the vocabulary"),
    (lambda ids, n: (ids[:0], n), r"prompt_tokens has shape \(0, 6\); allowed: \[B, P\] with B >= 1 and P >= 1"),
    (lambda ids, n: (ids, CFG.max_position - 5), rf"the longest prompt \(6 tokens\) \+ max_new_tokens="
                                                  rf"{CFG.max_position - 5} = {CFG.max_position + 1} positions exceed "
                                                  rf"ModelConfig.max_position={CFG.max_position}"),
])
def test_bad_prompts_fail_before_sampling(change, message):
  ids, lengths = left_pad(PROMPTS, 6, 0)
  ids, n = change(ids, N)
  with pytest.raises(ValueError, match=message):
    generate(CFG, _params(), ids, lengths[:len(ids)], jax.random.key(0), SamplingConfig(max_new_tokens=n))


def test_bad_pad_id_and_empty_prompt_list():
  ids, lengths = left_pad(PROMPTS, 6, 0)
  with pytest.raises(ValueError, match=rf"SamplingConfig.pad_id={CFG.vocab_size} is invalid; allowed: 0 <= pad_id < "
                                       rf"ModelConfig.vocab_size={CFG.vocab_size}"):
    generate(CFG, _params(), ids, lengths, jax.random.key(0), SamplingConfig(pad_id=CFG.vocab_size))
  with pytest.raises(ValueError, match=r"prompts is empty; allowed: at least one prompt"):
    left_pad([], 6, 0)
