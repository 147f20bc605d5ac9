"""Decoding on the GPU as the sampler does it (left-padded prompts prefilled into a bf16 latent/indexer cache,
then one token per step; `tests/sampling/test_decode_equivalence` on CPU) against the full forward of each
sequence, dense and sparse, with the implementation the sampler gets (None: the kernels where they apply).

The tiny kernel-width config of `test_model` (top-k 32) in bf16, sequences of 72 and 60 tokens, so that sparse
decoding selects among more keys than it keeps. Tolerance: max |decoded - full forward| <= 2 x max |full forward
(bf16) - full forward (float32, XLA)| over each sequence: the cache holds the same bf16 entries the full forward
computes, and decoding sums in other orders (one query, other kernels' tilings) like any other bf16 path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional
from tests.gpu.test_model import kernel_tiny
from tests.sampling.test_decode_equivalence import cached_logits

SEQS = [np.random.default_rng(0).integers(1, 512, 72).tolist(), np.random.default_rng(1).integers(1, 512, 60).tolist()]
PROMPT_LENS = (20, 41)


def decode_errors(params, attention: str, implementation: str | None = None) -> list[tuple[float, float]]:
  """Per sequence (max |decoded - full forward|, its bound)."""
  cached, lengths, width = cached_logits(kernel_tiny("bfloat16"), params, SEQS, PROMPT_LENS, attention)
  forward = lambda dtype, impl, ids: jax.jit(lambda p: functional.forward(
      kernel_tiny(dtype), p, ids, attention=attention, implementation=impl))(params)[0]
  errors = []
  for b, seq in enumerate(SEQS):
    ids = jnp.asarray([seq])
    full, full_f32 = forward("bfloat16", implementation, ids), forward("float32", "xla", ids)
    start = width - int(lengths[b])
    decoded = cached[b, start:start + len(seq)].astype(jnp.float32)
    errors.append((float(jnp.max(jnp.abs(decoded - full))), 2 * float(jnp.max(jnp.abs(full - full_f32))) + 1e-6))
  return errors


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_decode_equals_full_forward(attention):
  params = jax.jit(lambda: functional.init(kernel_tiny(), seed=3))()
  for b, (err, bound) in enumerate(decode_errors(params, attention)):
    assert err <= bound, f"{attention} sequence {b}: max |decoded - full forward| = {err:.3g} > bound {bound:.3g}"
