"""Lightning indexer on the GPU: `index_scores` (bf16 kernel; its backward is the reference's vjp),
`index_scores_fp8` and `index_topk` (scores kernel + pruned select, causal key-prefix stages, bf16 and FP8) by
default, against the float32 reference; at small shapes and at V3.2's (64 x 128 index heads, K = 2048,
T = S = 32K and 128K on sampled rows). Integer inputs make every score exact whatever the summation order, so
selection is compared exactly, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.lightning_indexer import api, reference
from pallas_kernels.topk import reference as topk_reference
from tests.gpu.checks import BF16_ROUNDING, F32_ROUNDING, assert_within, f32, finite, sample_rows
from tests.pallas_kernels.test_lightning_indexer import dequantised_fp8_inputs, make_inputs

# Hopper's fp8 wgmma accumulates with ~14 significant bits (DeepSeek-V3 paper 3.3.2): unit roundoff 2^-14, one bit
# of margin.
FP8_ACC_ROUNDING = 2.0**-13


def test_default_is_the_kernel():
  assert resolve_implementation(None, api.AVAILABLE, api._kernel_supports(jnp.zeros((1, 1, 64, 128), jnp.bfloat16)))\
      == "pallas"


def score_bound(q, k, w, rounding=F32_ROUNDING):
  """Any summation order of H products per head (each exact, accumulated with unit roundoff `rounding`) and of I
  weighted heads in float32 errs by at most (H rounding + I 2^-24) sum_i |w_i| sum_h |q_ih k_h| (gamma_n bound)."""
  (_, _, _, H), I = q.shape, q.shape[2]  # noqa: N806
  abs_sum = jnp.einsum("btih,bsh,bti->bts", jnp.abs(f32(q)), jnp.abs(f32(k)), jnp.abs(f32(w)))
  return (H * rounding + (I + 4) * F32_ROUNDING) * abs_sum


def assert_scores(got, want, bound):
  assert np.array_equal(jnp.isneginf(got), jnp.isneginf(want)), "visibility (-inf) differs"
  assert_within(finite(got), finite(want), bound, "scores")


def packed(lengths, batch=1):
  """Positions and segment ids [batch, sum(lengths)] of documents of these lengths, queries = keys."""
  pos = np.concatenate([np.arange(n) for n in lengths])
  seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
  pos, seg = (jnp.asarray(np.tile(x, (batch, 1)), jnp.int32) for x in (pos, seg))
  return dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)


def integer_inputs(seed, B, T, S, I, H):  # noqa: N803
  """q, k in {-2..2} (bf16, and e4m3 after quantisation, exactly), w in {1, 2} / 64: every score is exact in
  float32, with many ties."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.randint(ks[0], (B, T, I, H), -2, 3).astype(jnp.bfloat16)
  k = jax.random.randint(ks[1], (B, S, H), -2, 3).astype(jnp.bfloat16)
  return q, k, jax.random.randint(ks[2], (B, T, I), 1, 3).astype(jnp.float32) / 64


CASES = [(1, 128, 256, 4, 200), (2, 100, 190, 4, 70), (1, 64, 192, 3, 0), (1, 256, 512, 64, 100)]  # B T S I boundary


@pytest.mark.parametrize("B, T, S, I, boundary", CASES)
def test_scores_and_gradients(B, T, S, I, boundary):  # noqa: N803
  """bf16 scores (a document boundary inside a tile, ragged T and S, odd head counts, V3.2's 64 heads); the
  gradient is the reference's vjp on the bf16 inputs: only its bf16 results round (2^-8)."""
  (q, k, w), vis = make_inputs(0, B, T, S, I, 128, boundary)
  got = jax.jit(lambda q, k, w: api.index_scores(q, k, w, **vis))(q, k, w)
  want = reference.index_scores(*f32((q, k, w)), **vis)
  assert_scores(got, want, score_bound(q, k, w))
  loss = lambda impl: lambda *a: jnp.sum(finite(impl(*a, **vis)) * jnp.cos(jnp.arange(S)))
  grads = jax.jit(jax.grad(loss(api.index_scores), argnums=(0, 1, 2)))(q, k, w)
  want_grads = jax.grad(loss(reference.index_scores), argnums=(0, 1, 2))(*f32((q, k, w)))
  for name, g, wg in zip(("dq", "dk", "dw"), grads, want_grads):
    assert_within(g, wg, BF16_ROUNDING * jnp.abs(wg) + 1e-5 * jnp.max(jnp.abs(wg)), name)


@pytest.mark.parametrize("B, T, S, I, boundary", CASES)
def test_fp8_scores(B, T, S, I, boundary):  # noqa: N803
  """e4m3 scores of inputs whose rows span many binades; fp8 wgmma accumulates with ~14 bits (FP8_ACC_ROUNDING)."""
  (q, k, w), vis = dequantised_fp8_inputs(0, B, T, S, I, 128, boundary)
  q8, q_scale, k8, k_scale = api.quantize_fp8(q, k)
  got = jax.jit(lambda *a: api.index_scores_fp8(*a, **vis))(q8, q_scale, k8, k_scale, w)
  want = reference.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis)
  assert_scores(got, want, score_bound(q, k, w, FP8_ACC_ROUNDING))


def assert_topk_exact(idx, q, k, w, vis, topk, rows):
  """idx [B, T, K] on `rows` equals the reference's selection from the reference's (exact) scores."""
  vis_rows = dict(vis, q_positions=vis["q_positions"][:, rows], q_segment_ids=vis["q_segment_ids"][:, rows])
  scores = reference.index_scores(*f32((q[:, rows], k, w[:, rows])), **vis_rows)
  np.testing.assert_array_equal(idx[:, rows], topk_reference.topk_indices(scores, topk))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("causal_prefix", [None, False])
@pytest.mark.parametrize("lengths", [(512,), (200, 250, 62), (100, 412)])
def test_index_topk_small(lengths, causal_prefix, fp8):
  """8 row blocks of 64 queries (causal stages where allowed), k = 96 > the first rows' visible keys, packed
  documents, heavy ties: exactly the reference's selection."""
  vis = packed(lengths, batch=2)
  q, k, w = integer_inputs(1, 2, 512, 512, 4, 128)
  idx = jax.jit(lambda q, k, w: api.index_topk(q, k, w, topk=96, **vis, rows_per_block=64, fp8=fp8,
                                               causal_prefix=causal_prefix))(q, k, w)
  assert idx.shape == (2, 512, 96)
  assert_topk_exact(idx, q, k, w, vis, 96, np.arange(512))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("lengths", [
    (16384, 12000, 4384),  # T = 32K in 3 documents
    pytest.param((131072,), marks=pytest.mark.slow),  # T = 128K, one document: every causal key-prefix stage
], ids=["32K", "128K"])
def test_v32_production(lengths, fp8):
  """V3.2's 64 x 128 index heads, k = 2048, the default row blocks and causal stages: the scores (bf16) on sampled
  rows within their bound, the selection exact."""
  T = sum(lengths)  # noqa: N806
  vis = packed(lengths)
  rows = sample_rows(T, include=(1, 2047, 2048, *np.cumsum(lengths)[:-1], *(np.cumsum(lengths)[:-1] + 1), T - 1))
  q, k, w = integer_inputs(2, 1, T, T, 64, 128)
  idx = jax.jit(lambda q, k, w: api.index_topk(q, k, w, topk=2048, **vis, fp8=fp8))(q, k, w)
  assert_topk_exact(idx, q, k, w, vis, 2048, rows)
  if not fp8:
    (q, k, w), _ = make_inputs(3, 1, T, T, 64, 128, 0)
    scores = jax.jit(lambda q, k, w: api.index_scores(q, k, w, **vis))(q, k, w)[:, rows]
    q, w = q[:, rows], w[:, rows]
    want = reference.index_scores(*f32((q, k, w)), **dict(vis, q_positions=vis["q_positions"][:, rows],
                                                           q_segment_ids=vis["q_segment_ids"][:, rows]))
    assert_scores(scores, want, score_bound(q, k, w))
