"""Continuous batching over the paged cache: each prompt's greedy completion equals `generate` on it alone."""

import functools

import jax
import numpy as np
import pytest

from dsa_jax.model import functional
from dsa_jax.model.config import tiny
from dsa_jax.sampling import SamplingConfig, generate, left_pad
from dsa_jax.sampling.batcher import BatcherConfig, generate_continuous

CFG = tiny().replace(num_mtp_layers=0)
# Two prompt lengths (one compilation of `generate` each), five prompts for two slots.
PROMPTS = [[5, 17, 9], [33, 2, 41, 7, 8, 100], [3, 70, 11], [90, 4, 4, 61, 2, 8], [12, 13, 14]]
N = 10


@functools.lru_cache(maxsize=None)
def _params():
  return jax.jit(functools.partial(functional.init, CFG, seed=1))()


def _alone(prompt, sampling):
  ids, lengths = left_pad([prompt], len(prompt), 0)
  out = generate(CFG, _params(), ids, lengths, jax.random.key(0), sampling)
  return list(np.asarray(out.tokens[0, :int(out.lengths[0])]))


def test_continuous_batching_equals_each_prompt_alone():
  """Greedy, an EOS that stops some sequences early, 2 slots and a pool of 7 pages of 4 tokens: a 6-token prompt
  with its completion takes 4 pages, so two of them never run together and admissions wait for freed pages."""
  free = SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=-1)
  eos = _alone(PROMPTS[0], free)[3]
  sampling = SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=eos)
  expected = [_alone(p, sampling) for p in PROMPTS]
  assert len({len(e) for e in expected}) > 1, "the EOS should stop some sequences early"
  out = generate_continuous(CFG, _params(), PROMPTS, jax.random.key(0), sampling,
                            BatcherConfig(slots=2, num_pages=7, page_size=4, kv_dtype="float32", prompt_bucket=4))
  assert [c.tokens for c in out] == expected
  assert all(c.logprobs == [0.0] * len(c.tokens) for c in out)  # greedy: log 1


def test_prompt_larger_than_the_pool_fails_before_decoding():
  sampling = SamplingConfig(max_new_tokens=N, temperature=0.0)
  with pytest.raises(ValueError, match=r"the longest prompt and its completion need 4 pages of 4 tokens; allowed: "
                                       r"BatcherConfig.num_pages=3 >= 4"):
    generate_continuous(CFG, _params(), PROMPTS, jax.random.key(0), sampling,
                        BatcherConfig(slots=2, num_pages=3, page_size=4))
  with pytest.raises(ValueError, match=rf"prompts\[1\] \(length 1\) is invalid; allowed: 1 or more ids in "
                                       rf"0..vocab_size-1={CFG.vocab_size - 1}"):
    generate_continuous(CFG, _params(), [[1], [CFG.vocab_size]], jax.random.key(0), sampling)
  with pytest.raises(ValueError, match=r"BatcherConfig.kv_dtype='fp4' is invalid"):
    BatcherConfig(kv_dtype="fp4")
