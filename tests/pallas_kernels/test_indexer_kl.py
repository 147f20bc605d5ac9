"""Chunked indexer KL losses against the materialising reference: values and indexer gradients."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from pallas_kernels.indexer_kl import api, reference
from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.topk import reference as topk_reference
from pallas_kernels.visibility import visible

B, T, S, N, C, I, H = 2, 24, 40, 4, 16, 3, 8  # noqa: E741


def _inputs(seed: int):
  ks = jax.random.split(jax.random.key(seed), 6)
  q_positions = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  boundary = jnp.array([[0], [S - 10]])  # batch 1 packs two documents, the second starting at key S - 10
  q_segment_ids = (q_positions >= boundary).astype(jnp.int32)
  kv_segment_ids = (kv_positions >= boundary).astype(jnp.int32)
  vis = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
             kv_segment_ids=kv_segment_ids)
  attn_q = jax.random.normal(ks[0], (B, T, N, C))
  attn_k = jax.random.normal(ks[1], (B, S, C))
  scale = C**-0.5
  logits = jnp.einsum("btnc,bsc->btns", attn_q, attn_k) * scale
  mask = visible(**vis)[:, :, None, :]
  attn_lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
  idx = (jax.random.normal(ks[2], (B, T, I, H)), jax.random.normal(ks[3], (B, S, H)),
         jax.random.normal(ks[4], (B, T, I)))
  return (attn_q, attn_k, attn_lse, scale), idx, vis


class IndexerKLTest(parameterized.TestCase):

  def test_dense_matches_reference(self):
    attn, idx, vis = _inputs(time.time_ns())

    def loss(fn, *idx_args, **kw):
      return fn(*attn, *idx_args, **vis, **kw).sum()

    got, got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(api.dense_kl, *idx, t_chunk=8, s_chunk=16)
    want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(reference.dense_kl, *idx)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)
    chex.assert_shape(api.dense_kl(*attn, *idx, **vis), (B, T))
    self.assertGreater(float(want), 0.0)

  def test_sparse_matches_reference(self):
    attn, idx, vis = _inputs(time.time_ns())
    scores = indexer_reference.index_scores(*idx, **vis)
    indices = topk_reference.topk_indices(scores, 16)  # early rows have < 16 keys: -1 slots

    def loss(fn, *idx_args, **kw):
      return fn(*attn, *idx_args, indices, **vis, **kw).sum()

    got, got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(api.sparse_kl, *idx, t_chunk=5)
    want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(reference.sparse_kl, *idx)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)

  def test_attention_side_gets_no_gradient(self):
    attn, idx, vis = _inputs(time.time_ns())
    grads = jax.grad(lambda q, k, lse: api.dense_kl(q, k, lse, attn[3], *idx, **vis).sum(),
                     argnums=(0, 1, 2))(*attn[:3])
    chex.assert_trees_all_close(grads, jax.tree.map(jnp.zeros_like, grads))

  def test_kl_is_zero_when_indexer_matches_target(self):
    """With a single visible key per query both distributions are one-hot: KL = 0 (hand-computed)."""
    attn, idx, vis = _inputs(time.time_ns())
    vis = dict(vis, kv_segment_ids=jnp.broadcast_to(jnp.arange(S), (B, S)),
               q_segment_ids=vis["q_positions"])  # each query sees only the key at its own position
    lse = jnp.einsum("btnc,btc->btn", attn[0], jnp.take_along_axis(attn[1], vis["q_positions"][..., None], 1)) * attn[3]
    kl = api.dense_kl(attn[0], attn[1], lse, attn[3], *idx, **vis, t_chunk=8, s_chunk=16)
    np.testing.assert_allclose(kl, np.zeros((B, T)), atol=1e-5)
