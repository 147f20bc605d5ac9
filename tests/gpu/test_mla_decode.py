"""MLA decode on the GPU: the default path (the sparse MLA forward kernel over pool rows with its cp.async gather,
split-K and the XLA merge) against the float32 reference, at small shapes and at V3.2's (128 heads, 576 / 512,
K = 2048 of a 128K-row pool; dense over 32K positions), batch 1, 32 and 128 (split counts 16, 2, 1); the FP8 cache
through the kernel's FP8 variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.mla_decode import api, kernel, reference
from tests.gpu.checks import BF16_ROUNDING, F32_ROUNDING, assert_within, f32, finite
from tests.pallas_kernels.test_mla_decode import make_cache, make_indices, make_query, to_fp8

SCALE = 0.135


def test_default_is_the_kernel():
  q, (kv_nope, kv_rope) = make_query(0, 1, 128, 576), make_cache(0, 64, 512)
  c8, s = to_fp8(kv_nope)
  assert resolve_implementation(None, api.AVAILABLE, kernel.supports(q, kv_nope, None, kv_rope)) == "pallas"
  assert resolve_implementation(None, api.AVAILABLE, kernel.supports(q, c8, s, kv_rope)) == "pallas"


def check(q, kv_nope, kv_rope, rows, got, kv_scale=None):
  """got = (out, lse) against the float32 reference on pool rows `rows` [Q, K] (FP8 cache: kv_nope e4m3 with
  kv_scale)."""
  out, lse = got
  want_out, want_lse = reference.sparse_mla_decode(f32(q), kv_nope, kv_scale, kv_rope, rows, scale=SCALE)
  values = reference.dequantize(kv_nope, kv_scale)
  keys = jnp.concatenate([values, f32(kv_rope)], -1)[jnp.maximum(rows, 0)]
  # Logits: float32 sums of 576 exact bf16 products, off by at most (dk + 8) 2^-24 scale sum_d |q_d k_d|; lse
  # inherits it plus a few roundings of exp / log.
  abs_logit = jnp.max(jnp.einsum("qnd,qkd->qnk", jnp.abs(f32(q)), jnp.abs(keys)), axis=-1) * SCALE
  lse_bound = (q.shape[-1] + 8) * F32_ROUNDING * abs_logit + 16 * F32_ROUNDING * jnp.abs(finite(want_lse))
  if kv_scale is not None:  # FP8: the kernel's keys are the dequantised values rounded to bf16
    lse_bound = lse_bound + BF16_ROUNDING * abs_logit
  assert np.array_equal(jnp.isneginf(lse), jnp.isneginf(want_lse))
  assert_within(finite(lse), finite(want_lse), lse_bound, "lse")
  # out: weights rounded to bf16 (2^-8, they sum to 1), each split-K partial and out rounded to bf16 (2^-9 each);
  # FP8: each dequantised value rounded to bf16 too (one more rounding).
  max_v = float(jnp.max(jnp.abs(values)))
  roundings = (3 if kv_scale is not None else 2) * BF16_ROUNDING
  assert_within(out, want_out, (roundings + 2 * lse_bound[..., None]) * max_v, "out")


@pytest.mark.parametrize("Q, N, rows, K, C, splits", [
    (3, 64, 48, 70, 128, None),
    (2, 16, 40, 150, 256, 2),
    (1, 80, 300, 200, 256, 3),
    (1, 128, 131072, 2048, 512, None),  # V3.2, batch 1: 16 parts
    (32, 128, 131072, 2048, 512, None),  # batch 32: 2 parts
    (128, 128, 131072, 2048, 512, None),  # batch 128: unsplit
])
def test_sparse(Q, N, rows, K, C, splits):  # noqa: N803
  kv_nope, kv_rope = make_cache(0, rows, C)
  q, idx = make_query(1, Q, N, C + 64), make_indices(2, Q, K, rows)
  idx = idx.at[0, K // 3:].set(-1)  # a row with fewer than K valid
  got = jax.jit(lambda *a: api.sparse_mla_decode(*a, scale=SCALE, num_splits=splits))(q, kv_nope, None, kv_rope, idx)
  check(q, kv_nope, kv_rope, idx, got)


@pytest.mark.parametrize("Q, N, rows, K, C, splits", [
    (2, 16, 300, 384, 256, 2),
    (1, 128, 131072, 2048, 512, None),  # V3.2, batch 1: 16 parts
    (128, 128, 131072, 2048, 512, None),  # batch 128: unsplit
])
def test_sparse_fp8(Q, N, rows, K, C, splits):  # noqa: N803
  """The FP8 cache (e4m3 latent, a float32 scale per 128 values) through the kernel's FP8 variant (the default)."""
  kv_nope, kv_rope = make_cache(6, rows, C)
  c8, s = to_fp8(kv_nope)
  q, idx = make_query(7, Q, N, C + 64), make_indices(8, Q, K, rows)
  idx = idx.at[0, K // 3:].set(-1)
  got = jax.jit(lambda *a: api.sparse_mla_decode(*a, scale=SCALE, num_splits=splits))(q, c8, s, kv_rope, idx)
  check(q, c8, kv_rope, idx, got, kv_scale=s)


def test_dense_v32():
  """Four rows of 32K positions in shuffled 64-row pages, lengths 0, 1000, 20000 and 32768."""
  pages, page = 4 * 512, 64
  kv_nope, kv_rope = make_cache(3, pages * page, 512)
  table = jax.random.permutation(jax.random.key(4), pages).reshape(4, 512).astype(jnp.int32)
  lengths = jnp.array([0, 1000, 20000, 32768], jnp.int32)
  q = make_query(5, 4, 128, 576)
  got = jax.jit(lambda *a: api.dense_mla_decode(*a, scale=SCALE, page_size=page))(q, kv_nope, None, kv_rope, table,
                                                                                  lengths)
  check(q, kv_nope, kv_rope, reference.dense_rows(table, lengths, page_size=page), got)
