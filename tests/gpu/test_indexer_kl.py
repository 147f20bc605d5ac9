"""Indexer KL on the GPU: `dense_kl` by default (forward kernel, backward kernel with TMA reduce-adds into d idx_k)
and with `deterministic=True` (the chunked XLA backward), `sparse_kl` by default (cp.async-gathering forward and
backward kernels), against the float32 reference: KL per query and the indexer gradients, at small shapes and at
V3.2's (128 heads x 576, 64 x 128 index heads, K = 2048, T = S = 16K on sampled rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.indexer_kl import api, reference
from pallas_kernels.visibility import visible
from tests.gpu.checks import assert_close_to_scale, assert_within, only_rows, sample_rows
from tests.pallas_kernels.test_indexer_kl import make_inputs, sparse_indices

DENSE = {"default": {}, "deterministic": {"deterministic": True}}
# KL: float32 sums of exact bf16 products (C = 576, H = 128 terms) err by ~sqrt(C) 2^-24 scale sum |q k| ~ 1e-5 at
# these magnitudes; the KL moves by a few times its logits' error.
KL_TOL = 1e-4
# Gradients: every backward (kernels and the deterministic XLA one) rounds dL to the inputs' bf16 before its matmuls,
# 2^-8 relative, in sums of signed terms whose largest reaches several times the largest result, and returns bf16
# (2^-8): 1e-2 of the largest.
GRAD_REL = 1e-2
SCALE_V32 = 0.1352338


def test_default_is_the_kernel():
  q, iq = jnp.zeros((1, 4, 128, 576), jnp.bfloat16), jnp.zeros((1, 4, 64, 128), jnp.bfloat16)
  assert resolve_implementation(None, api.AVAILABLE, api._kernel_supports(q, iq)) == "pallas"
  assert resolve_implementation(None, api.AVAILABLE, api._sparse_kernel_supports(q, iq, 16384)) == "pallas"


def bf16(tree):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


def check(attn, idx, vis, indices, options, rows=None, seed=2):
  """The loss (sparse when `indices` is given) on every query, checked on `rows` (default all) against the
  reference; the cotangent g is random on `rows` and zero elsewhere, so d idx_k sums the sampled rows only."""
  (attn_q, attn_k, lse, scale), (iq, ik, iw) = attn, idx
  B, T = iw.shape[:2]  # noqa: N806
  rows = np.arange(T) if rows is None else rows
  g = only_rows(jax.random.normal(jax.random.key(seed), (B, T)), rows)
  extra = () if indices is None else (indices,)
  fn = api.dense_kl if indices is None else api.sparse_kl

  @jax.jit
  def kernel(attn_q, attn_k, lse, iq, ik, iw, g, *extra):
    kl, vjp = jax.vjp(lambda *i: fn(attn_q, attn_k, lse, scale, *i, *extra, **vis, **options), iq, ik, iw)
    return kl, vjp(g)

  kl, grads = kernel(*bf16((attn_q, attn_k)), lse, *bf16((iq, ik)), iw, g, *extra)
  at_rows = lambda x: x[:, rows]
  vis_rows = dict(vis, q_positions=at_rows(vis["q_positions"]), q_segment_ids=at_rows(vis["q_segment_ids"]))
  ref = reference.dense_kl if indices is None else reference.sparse_kl
  extra_rows = () if indices is None else (at_rows(indices),)
  want, vjp = jax.vjp(lambda q, k, w: ref(at_rows(attn_q), attn_k, at_rows(lse), scale, q, k, w, *extra_rows,
                                          **vis_rows), at_rows(iq), ik, at_rows(iw))
  want_grads = vjp(g[:, rows])
  assert_within(kl[:, rows], want, KL_TOL * (1 + jnp.abs(want)), "KL")
  for name, got, w in zip(("d idx_q", "d idx_k", "d idx_w"), (at_rows(grads[0]), grads[1], at_rows(grads[2])),
                          want_grads):
    assert_close_to_scale(got, w, GRAD_REL, name)
  return kl


@pytest.mark.parametrize("option", DENSE)
@pytest.mark.parametrize("B, T, S, N, C, I, H, boundary, first_query", [
    (2, 7, 150, 16, 128, 8, 64, 146, 143),  # row 1: a document starting at 146 (a query that sees only itself)
    (1, 3, 200, 16, 576, 16, 128, 0, 117),  # V3.2 widths, few heads; later key tiles skipped causally
    (1, 64, 512, 128, 576, 64, 128, 0, 448),  # V3.2 heads and widths
])
def test_dense_small(option, B, T, S, N, C, I, H, boundary, first_query):  # noqa: N803
  attn, idx, vis = make_inputs(T + S, B, T, S, N, C, I, H, boundary, first_query)
  kl = check(attn, idx, vis, None, DENSE[option])
  if boundary:  # the query at the document start sees one key: both distributions are one-hot
    np.testing.assert_allclose(kl[1, boundary - first_query], 0.0, atol=1e-6)


@pytest.mark.parametrize("B, T, S, N, C, I, H, K", [
    (2, 2, 160, 16, 64, 8, 64, 70),  # two 64-key blocks, the second partly padding; row 1's last query sees 2 keys
    (1, 2, 96, 16, 576, 16, 128, 40),  # V3.2 widths, few heads
    (1, 16, 4096, 128, 576, 64, 128, 2048),  # V3.2 heads, widths and K
])
def test_sparse_small(B, T, S, N, C, I, H, K):  # noqa: N803
  """Every query selects key S // 2 (repeated across queries), every 5th slot is -1, the first query of row 0 has
  no valid key (KL 0), selections later than the query or in another document are masked."""
  attn, idx, vis = make_inputs(S + K, B, T, S, N, C, I, H, S - 2, S - T)
  kl = check(attn, idx, vis, sparse_indices(K, B, T, S, K), {})
  assert float(kl[0, 0]) == 0.0


def production_inputs(seed, T, boundary, N=128, C=576, I=64, H=128, block=256):  # noqa: N803
  """bf16-representable float32 inputs at V3.2 sizes, queries = keys, documents [0, boundary) and [boundary, T);
  the attention lse is exact, computed in query blocks (never [T, N, T] at once)."""
  ks = jax.random.split(jax.random.key(seed), 5)
  r = lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16).astype(jnp.float32)
  pos = jnp.arange(T)[None]
  seg = (pos >= boundary).astype(jnp.int32)
  pos = jnp.where(seg == 1, pos - boundary, pos)
  vis = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  attn_q, attn_k = r(ks[0], (1, T, N, C)), r(ks[1], (1, T, C))

  def block_lse(args):
    q, qp, qs = args
    logits = jnp.einsum("tnc,sc->tns", q, attn_k[0]) * SCALE_V32
    mask = visible(qp[None], vis["kv_positions"], qs[None], vis["kv_segment_ids"])[0][:, None]
    return jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)

  split = lambda x: x[0].reshape(T // block, block, *x.shape[2:])
  lse = jax.lax.map(block_lse, (split(attn_q), split(pos), split(seg))).reshape(1, T, N)
  idx = (r(ks[2], (1, T, I, H)), r(ks[3], (1, T, H)), jax.random.normal(ks[4], (1, T, I)) * (I * H) ** -0.5)
  return (attn_q, attn_k, lse, SCALE_V32), idx, vis


@pytest.mark.parametrize("loss", ["dense", "deterministic", "sparse"])
def test_v32_production(loss):
  """T = S = 16K (the sparse kernels' largest default key count) in two documents, ~260 sampled rows."""
  T, boundary = 16384, 10000  # noqa: N806
  attn, idx, vis = production_inputs(7, T, boundary)
  rows = sample_rows(T, include=(1, 2047, boundary, boundary + 1))
  indices = sparse_indices(3, 1, T, T, 2048) if loss == "sparse" else None
  check(attn, idx, vis, indices, DENSE.get(loss, {}), rows=rows)
