"""Reference indexer KL losses (the spec; DeepSeek-V3.2 paper section 2.1, "Continued Pre-Training").

Target p[t, :]: the main attention probabilities summed over heads and L1-normalised over keys. With the
attention's own logsumexp every head's row already sums to 1, so p is their mean; normalising by the
actual sum keeps p a distribution when the lse is only approximately the attention's (bf16 attention) and
gives the sparse stage's renormalisation over the selected set S_t for free.
Loss per query: KL(p[t, :] || softmax(I[t, :])) over the visible keys (dense warm-up) or over S_t (sparse
stage); 0 for a query with no key. Everything here is materialised ([B, T, N, S]): tests only.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.visibility import visible


def kl_from_scores(attn_logits: jax.Array, attn_lse: jax.Array, index_scores: jax.Array,
                   keep: jax.Array) -> jax.Array:
  """attn_logits [B, T, N, S] (scaled), attn_lse [B, T, N], index_scores [B, T, S], keep [B, T, S] -> [B, T]."""
  probs = jnp.exp(attn_logits - attn_lse[..., None]).sum(axis=2)
  probs = jnp.where(keep, probs, 0.0)
  p = probs / jnp.maximum(probs.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  any_key = keep.any(axis=-1, keepdims=True)
  scores = jnp.where(keep, index_scores, jnp.where(any_key, -jnp.inf, 0.0))  # finite rows: no NaN gradients
  log_q = scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True)
  terms = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - jnp.where(keep, log_q, 0.0)), 0.0)
  return jnp.where(any_key[..., 0], terms.sum(axis=-1), 0.0)


def _dense_parts(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, visibility):
  attn_logits = jnp.einsum("btnh,bsh->btns", attn_q, attn_k, preferred_element_type=jnp.float32) * attn_scale
  scores = indexer_reference.index_scores(idx_q, idx_k, idx_w, **visibility)
  return jax.lax.stop_gradient(attn_logits), jax.lax.stop_gradient(attn_lse), scores, visible(**visibility)


def dense_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, *, q_positions, kv_positions,
             q_segment_ids, kv_segment_ids) -> jax.Array:
  """Dense warm-up KL per query [B, T]; shapes as in `api.dense_kl`."""
  visibility = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids)
  return kl_from_scores(*_dense_parts(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, visibility))


def sparse_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, indices, *, q_positions,
              kv_positions, q_segment_ids, kv_segment_ids) -> jax.Array:
  """Sparse-stage KL per query [B, T] over the selected keys `indices` [B, T, K] (-1 = empty slot)."""
  visibility = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids)
  attn_logits, lse, scores, vis = _dense_parts(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w,
                                               visibility)
  n = attn_k.shape[1]
  selected = jax.nn.one_hot(jnp.where(indices >= 0, indices, n), n, dtype=jnp.bool_).any(axis=2)
  return kl_from_scores(attn_logits, lse, scores, vis & selected)
