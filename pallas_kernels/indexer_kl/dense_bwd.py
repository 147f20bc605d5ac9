"""Backward of the dense indexer KL as a chunked XLA computation (no Pallas kernel yet).

With p̂ = p / z the target and q = softmax(I) over the visible keys, d KL[t] / d I[t, s] = q[t, s] - p̂[t, s].
The forward's statistics give logsumexp(I)[t] and z[t], so one pass over (query chunk, key chunk) pairs
recomputes p and I of the pair and pushes G = g (q - p̂) through I = sum_j w_j ReLU(iq_j . ik):
  dL/dlogit[t, j, s] = G[t, s] w[t, j] [logit > 0],  d iq = dL/dlogit . ik,  d ik = dL/dlogit^T . iq,
  d w[t, j] = sum_s G[t, s] ReLU(logit[t, j, s]).
Written out rather than differentiated, so the attention logits (the expensive part) are computed once.
Per query chunk the key loop runs only over the key chunks that one of its queries sees (causal order,
segments): the other pairs contribute exact zeros, so the gradients are those of the full loop, at about
half its cost for one causal document.
Memory: one chunk pair's [B, t, N, s] logits, plus a float32 [B, S, H] accumulator of d ik.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import PAD_POSITION, pad_chunks, unchunk, visible_block_ranges


def _pair_grads(q_side, kv_side, *, attn_scale):
  """Gradient contributions of one (query chunk, key chunk) pair: d iq, d w of the queries and d ik of the keys."""
  attn_q, attn_lse, idx_q, idx_w, q_pos, q_seg, lse_scores, inv_z, g = q_side
  attn_k, idx_k, kv_pos, kv_seg = kv_side
  keep = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])
  attn_logits = jnp.einsum("btnc,bsc->btns", attn_q, attn_k, preferred_element_type=jnp.float32) * attn_scale
  probs = jnp.exp(attn_logits - attn_lse[..., None]).sum(axis=2)
  logits = jnp.einsum("btih,bsh->btis", idx_q, idx_k, preferred_element_type=jnp.float32)
  w = idx_w.astype(jnp.float32)
  scores = jnp.einsum("btis,bti->bts", jax.nn.relu(logits), w)
  softmax = jnp.exp(jnp.where(keep, scores - lse_scores[..., None], -jnp.inf))
  grad_scores = jnp.where(keep, g[..., None] * (softmax - probs * inv_z[..., None]), 0.0)
  grad_logits = jnp.where(logits > 0, grad_scores[:, :, None, :] * w[..., None], 0.0)
  d_idx_q = jnp.einsum("btis,bsh->btih", grad_logits.astype(idx_k.dtype), idx_k, preferred_element_type=jnp.float32)
  d_idx_k = jnp.einsum("btis,btih->bsh", grad_logits.astype(idx_q.dtype), idx_q, preferred_element_type=jnp.float32)
  d_idx_w = jnp.einsum("bts,btis->bti", grad_scores, jax.nn.relu(logits))
  return d_idx_q, d_idx_k, d_idx_w


def dense_kl_grads(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, lse_scores, z, g, *,
                   q_positions, kv_positions, q_segment_ids, kv_segment_ids, t_chunk: int = 256,
                   s_chunk: int = 1024) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cotangent g [B, T] of the dense KL -> gradients w.r.t. idx_q, idx_k, idx_w (in their dtypes).

  lse_scores [B, T] = logsumexp of the visible indexer scores and z [B, T] = sum of p over the visible keys,
  both from the forward pass; queries with z = 0 (no visible key) have KL = 0 and get no gradient.
  """
  T, S = attn_q.shape[1], attn_k.shape[1]  # noqa: N806
  t_chunk, s_chunk = min(t_chunk, T), min(s_chunk, S)
  has_keys = z > 0
  inv_z = jnp.where(has_keys, 1.0 / jnp.where(has_keys, z, 1.0), 0.0)
  g = jnp.where(has_keys, g.astype(jnp.float32), 0.0)
  lse_scores = jnp.where(has_keys, lse_scores, 0.0)
  kv_chunks = (pad_chunks(attn_k, s_chunk), pad_chunks(idx_k, s_chunk),
               pad_chunks(kv_positions, s_chunk, PAD_POSITION), pad_chunks(kv_segment_ids, s_chunk))
  q_chunks = tuple(pad_chunks(x, t_chunk) for x in (attn_q, attn_lse, idx_q, idx_w, q_positions, q_segment_ids,
                                                    lse_scores, inv_z, g))
  lo, hi = _key_chunk_ranges(kv_chunks[2], kv_chunks[3], q_positions, q_segment_ids, t_chunk)

  def query_chunk(d_idx_k, args):
    q_side, lo, hi = args

    def key_chunk(j, carry):
      d_idx_q, d_idx_w, d_idx_k = carry
      dq, dk, dw = _pair_grads(q_side, jax.tree.map(lambda x: x[j], kv_chunks), attn_scale=attn_scale)
      return d_idx_q + dq, d_idx_w + dw, d_idx_k.at[j].add(dk)

    zeros = (jnp.zeros(q_side[2].shape, jnp.float32), jnp.zeros(q_side[3].shape, jnp.float32))
    d_idx_q, d_idx_w, d_idx_k = jax.lax.fori_loop(lo, hi, key_chunk, (*zeros, d_idx_k))
    return d_idx_k, (d_idx_q, d_idx_w)

  d_idx_k = jnp.zeros(kv_chunks[1].shape, jnp.float32)
  d_idx_k, (d_idx_q, d_idx_w) = jax.lax.scan(query_chunk, d_idx_k, (q_chunks, lo, hi))
  return (unchunk(d_idx_q, T).astype(idx_q.dtype), unchunk(d_idx_k, S).astype(idx_k.dtype),
          unchunk(d_idx_w, T).astype(idx_w.dtype))


def _key_chunk_ranges(kv_pos_chunks, kv_seg_chunks, q_positions, q_segment_ids, t_chunk):
  """int32 [T_pad / t_chunk] each: per query chunk the first and one-past-last key chunk any of its queries sees.

  Key chunks outside contribute exact zeros, so skipping them changes no result.
  """
  n_kv, batch, s_chunk = kv_pos_chunks.shape
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, n_kv * s_chunk)
  ranges = visible_block_ranges(q_positions, merge(kv_pos_chunks), q_segment_ids, merge(kv_seg_chunks), s_chunk)
  empty = ranges[..., 1] == 0
  lo = pad_chunks(jnp.where(empty, n_kv, ranges[..., 0]), t_chunk, n_kv).min(axis=(1, 2))
  hi = pad_chunks(ranges[..., 1], t_chunk).max(axis=(1, 2))
  return jnp.minimum(lo, hi), hi
