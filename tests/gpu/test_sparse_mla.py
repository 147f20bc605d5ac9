"""Sparse MLA on the GPU: the default path (the Mosaic GPU forward with its cp.async row gather, the backward kernel
with TMA reduce-adds into dkv) and `deterministic=True` (the chunked XLA backward), against the float32 reference:
out, lse, dq, dkv, at small shapes and at V3.2's (128 heads, 576 / 512, K = 2048, T = S = 32K on sampled rows; the last
2048 queries of a 128K-token row)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.sparse_mla import api, kernel_fwd, reference
from tests.gpu.checks import (BF16_ROUNDING, F32_ROUNDING, assert_close_to_scale, assert_within, f32, finite, only_rows,
                              sample_rows)
from tests.pallas_kernels.test_sparse_mla import make_inputs

SCALE = 0.135  # V3.2's softmax scale (192^-0.5 times the YaRN mscale^2)
OPTIONS = {"default": {}, "deterministic": {"deterministic": True}}
# Gradients: bf16 operands P and dS in the backward's matmuls (2^-8 relative each) and the bf16 result (2^-8); the
# rounding errors of K signed terms add up like sqrt(K) while the terms' sum grows about as fast, so the error stays
# a small multiple of 2^-8 of the largest result: 5 x 2^-8 ~ 2e-2.
GRAD_REL = 2e-2


def test_default_is_the_kernel():
  assert resolve_implementation(None, api.AVAILABLE, kernel_fwd.supports(576, 512, jnp.bfloat16)) == "pallas"


def check(q, kv, idx, v_dim, options, rows=None, seed=1):
  """Runs sparse_mla on every query row and checks `rows` (default all) against the float32 reference; the
  cotangents of out and lse are random on `rows` and zero elsewhere, so dkv sums the sampled rows only."""
  B, T, N, dk = q.shape  # noqa: N806
  rows = np.arange(T) if rows is None else rows
  ks = jax.random.split(jax.random.key(seed))
  do = only_rows(jax.random.normal(ks[0], (B, T, N, v_dim), jnp.bfloat16), rows)
  seen = jnp.any(idx >= 0, axis=-1)[..., None]  # lse is -inf on a row with no valid index: no cotangent there
  dlse = only_rows(jnp.where(seen, jax.random.normal(ks[1], (B, T, N)), 0.0), rows)

  @jax.jit
  def kernel(q, kv, idx, do, dlse):
    f = lambda q, kv: api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=v_dim, **options)
    (out, lse), vjp = jax.vjp(f, q, kv)
    return out, lse, *vjp((do, dlse))

  out, lse, dq, dkv = kernel(q, kv, idx, do, dlse)
  assert (out.dtype, lse.dtype, dq.dtype, dkv.dtype) == (q.dtype, jnp.float32, q.dtype, kv.dtype)
  q_r, idx_r = f32(q[:, rows]), idx[:, rows]
  (want_out, want_lse), vjp = jax.vjp(lambda q, kv: reference.sparse_mla(q, kv, idx_r, scale=SCALE, v_dim=v_dim),
                                      q_r, f32(kv))
  want_dq, want_dkv = vjp((f32(do[:, rows]), dlse[:, rows]))
  # Logits: float32 sums of dk exact bf16 products, off by at most dk 2^-24 scale sum_d |q_d k_d| (gamma_n bound);
  # lse and the softmax weights inherit it (twice for the weights), plus a few float32 roundings of exp / log.
  gathered = jax.vmap(lambda rows, i: rows[i])(jnp.abs(f32(kv)), jnp.maximum(idx_r, 0))
  abs_logit = jnp.max(jnp.einsum("btnd,btkd->btnk", jnp.abs(q_r), gathered), axis=-1) * SCALE
  lse_bound = (dk + 8) * F32_ROUNDING * abs_logit + 16 * F32_ROUNDING * jnp.abs(finite(want_lse))
  assert np.array_equal(jnp.isneginf(lse[:, rows]), jnp.isneginf(want_lse))
  assert_within(finite(lse[:, rows]), finite(want_lse), lse_bound, "lse")
  # out: weights rounded to bf16 (2^-8 each, they sum to 1) and out rounded to bf16 (2^-8 |out|): 2^-7 max|v|.
  max_v = float(jnp.max(jnp.abs(f32(kv[..., :v_dim]))))
  assert_within(out[:, rows], want_out, (2 * BF16_ROUNDING + 2 * lse_bound[..., None]) * max_v, "out")
  assert_close_to_scale(dq[:, rows], want_dq, GRAD_REL, "dq")
  assert_close_to_scale(dkv, want_dkv, GRAD_REL, "dkv")
  assert not np.any(only_rows(dq, np.setdiff1d(np.arange(T), rows)).astype(bool)), "dq outside the sampled rows"
  return out, lse, dq, dkv


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("B, T, N, S, K, C", [
    (1, 2, 64, 40, 70, 128),  # one 64-head tile; K = 70: a second key block of mostly padding; repeats (K > S)
    (2, 1, 80, 40, 150, 128),  # two head tiles, the second padded
    (1, 2, 16, 40, 70, 256),  # 128-column dkv slabs beside the rope columns
    (1, 4, 128, 4096, 2048, 512),  # V3.2 widths and K, few queries
])
def test_small(option, B, T, N, S, K, C):  # noqa: N803
  q, kv, idx = make_inputs(0, B, T, N, S, K, C)
  check(q, kv, idx, C, OPTIONS[option])


@pytest.mark.parametrize("option", OPTIONS)
def test_invalid_and_repeated_indices(option):
  """Query 1 has no valid index (out 0, lse -inf, dq 0); only keys 1 to 11 are selected (dkv 0 elsewhere); key 3
  fills 8 slots of every query and key 5 one (its dkv row sums them)."""
  q, kv, idx = make_inputs(3, 1, 3, 64, 24, 64, invalid=0.3, low=1)
  idx = jnp.where(idx >= 0, idx % 11 + 1, -1).at[:, :, :8].set(3).at[:, :, 8].set(5).at[:, 1].set(-1)
  out, lse, dq, dkv = check(q, kv, idx, 128, OPTIONS[option])
  assert not np.any(out[:, 1].astype(bool)) and bool(jnp.all(jnp.isneginf(lse[:, 1])))
  assert not np.any(dq[:, 1].astype(bool)) and not np.any(dkv[:, 0].astype(bool))
  assert not np.any(dkv[:, 12:].astype(bool))


def causal_indices(seed, T, K, invalid=0.05):  # noqa: N803
  """[1, T, K] indices of keys <= each query (with repeats), -1 past a query's t + 1 visible keys (rows t < K - 1
  have fewer than K) and at a fraction `invalid` of slots."""
  ks = jax.random.split(jax.random.key(seed))
  t = jnp.arange(T)[:, None]
  idx = jnp.floor(jax.random.uniform(ks[0], (T, K)) * (t + 1)).astype(jnp.int32)
  drop = (jnp.arange(K)[None] > t) | (jax.random.uniform(ks[1], (T, K)) < invalid)
  return jnp.where(drop, -1, idx)[None]


@pytest.mark.parametrize("option", OPTIONS)
def test_v32_production(option):
  """T = S = 32K, 128 heads, 576 / 512, K = 2048; ~260 sampled rows include the first rows (fewer than K keys)."""
  T, K = 32768, 2048  # noqa: N806
  ks = jax.random.split(jax.random.key(5))
  q = jax.random.normal(ks[0], (1, T, 128, 576), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, T, 576), jnp.bfloat16)
  check(q, kv, causal_indices(6, T, K), 512, OPTIONS[option], rows=sample_rows(T, include=(1, 2, K - 2, K - 1)))


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_v32_128k_keys(option):
  """The last 2048 queries of a 131072-token row (each selects K = 2048 of the keys at or before its position, with
  repeats and 5% invalid slots): row gathers and dkv reduce-adds over the whole 128K-key latent cache."""
  T, S, K = 2048, 131072, 2048  # noqa: N806
  ks = jax.random.split(jax.random.key(7), 4)
  q = jax.random.normal(ks[0], (1, T, 128, 576), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, S, 576), jnp.bfloat16)
  positions = jnp.arange(S - T, S)[:, None]
  idx = jnp.floor(jax.random.uniform(ks[2], (T, K)) * (positions + 1)).astype(jnp.int32)
  idx = jnp.where(jax.random.uniform(ks[3], (T, K)) < 0.05, -1, idx)[None]
  check(q, kv, idx, 512, OPTIONS[option], rows=sample_rows(T))
