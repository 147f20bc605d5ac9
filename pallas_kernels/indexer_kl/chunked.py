"""The indexer KL losses as chunked XLA computations: the "xla" implementation of `api.dense_kl` / `api.sparse_kl`
and the deterministic backward of the dense "pallas" one. Semantics are `reference.py`'s; nothing of size
[T, S] or [N, T, S] is materialised.

Dense forward: a loop over query chunks folds key chunks with an online logsumexp of the indexer scores and
running sums of the target mass z = sum p, a = sum p I and c = sum p log p, so KL = c/z - log z - a/z +
logsumexp(I). Each key chunk is `jax.checkpoint`ed, so JAX's backward recomputes a chunk instead of storing it:
memory O(t_chunk N s_chunk) plus O(T S / s_chunk) floats of loop carries. It visits every (query, key) chunk
pair, masked or not.

Sparse forward: a loop over query chunks that gathers each query's K selected keys (from a float32 copy of the
index keys, so that the gather's backward, a scatter-add of every selecting query's term, accumulates in
float32: in bf16 it rounded once per term, ~1400 per key at T = 8K, K = 2048).

Dense backward (`dense_kl_grads`), written out rather than differentiated, so the attention logits (the expensive
part) are computed once: with p^ = p / z the target and q = softmax(I) over the visible keys,
d KL[t] / d I[t, s] = q[t, s] - p^[t, s]; from the forward's logsumexp(I)[t] and z[t] one pass over (query
chunk, key chunk) pairs recomputes p and I of the pair and pushes G = g (q - p^) through
I = sum_j w_j ReLU(iq_j . ik):
  dL/dlogit[t, j, s] = G[t, s] w[t, j] [logit > 0],  d iq = dL/dlogit . ik,  d ik = dL/dlogit^T . iq,
  d w[t, j] = sum_s G[t, s] ReLU(logit[t, j, s]).
Per query chunk the key loop runs only over the key chunks that one of its queries sees (causal order,
segments): the other pairs contribute exact zeros. Memory: one chunk pair's [B, t, N, s] logits, plus a float32
[B, S, H] accumulator of d ik. Bitwise reproducible (no atomics), unlike the backward kernel.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import pad_chunks, unchunk
from pallas_kernels.indexer_kl import reference
from pallas_kernels.visibility import PAD_POSITION, visible_block_ranges



def _chunk_scores(q_chunk, k_chunk, attn_scale, idx_q, idx_k, idx_w):
  """Attention logits [B, t, N, s] and indexer scores [B, t, s] of one (query, key) chunk pair."""
  attn_logits = jnp.einsum("btnc,bsc->btns", q_chunk, k_chunk, preferred_element_type=jnp.float32) * attn_scale
  logits = jnp.einsum("btih,bsh->btis", idx_q, idx_k, preferred_element_type=jnp.float32)
  return attn_logits, jnp.einsum("btis,bti->bts", jax.nn.relu(logits), idx_w.astype(jnp.float32))


def _dense_query_chunk(args, *, attn_scale, kv_chunks):
  """One query chunk's KL [B, t]: every key chunk folded into the running (m, l, z, a, c)."""
  attn_q, attn_lse, idx_q, idx_w, q_pos, q_seg = args
  batch, rows = q_pos.shape

  @jax.checkpoint
  def fold(carry, kv):
    m, l, z, a, c = carry
    attn_k, idx_k, kv_pos, kv_seg = kv
    attn_logits, scores = _chunk_scores(attn_q, attn_k, attn_scale, idx_q, idx_k, idx_w)
    keep = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])
    probs = jnp.where(keep, jnp.exp(attn_logits - attn_lse[..., None]).sum(axis=2), 0.0)
    m_new = jnp.maximum(m, jnp.where(keep, scores, -jnp.inf).max(axis=-1))
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    l = l * jnp.exp(jnp.where(jnp.isfinite(m), m - m_ref, -jnp.inf)) + jnp.where(
        keep, jnp.exp(jnp.where(keep, scores, 0.0) - m_ref[..., None]), 0.0).sum(axis=-1)
    log_probs = jnp.log(jnp.where(probs > 0, probs, 1.0))
    z = z + probs.sum(axis=-1)
    a = a + jnp.where(keep, probs * scores, 0.0).sum(axis=-1)
    c = c + (probs * log_probs).sum(axis=-1)
    return (m_new, l, z, a, c), None

  zeros = jnp.zeros((batch, rows), jnp.float32)
  (m, l, z, a, c), _ = jax.lax.scan(fold, (jnp.full_like(zeros, -jnp.inf), zeros, zeros, zeros, zeros), kv_chunks)
  has_keys = z > 0
  z_safe = jnp.where(has_keys, z, 1.0)
  lse_scores = jnp.where(has_keys, m, 0.0) + jnp.log(jnp.where(has_keys, l, 1.0))
  return jnp.where(has_keys, c / z_safe - jnp.log(z_safe) - a / z_safe + lse_scores, 0.0)


def dense_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, *, q_positions, kv_positions,
             q_segment_ids, kv_segment_ids, t_chunk: int, s_chunk: int) -> jax.Array:
  """Dense warm-up KL per query [B, T]; arguments as `api.dense_kl` (attn_* already stop-gradient)."""
  T = attn_q.shape[1]  # noqa: N806
  t_chunk, s_chunk = min(t_chunk, T), min(s_chunk, attn_k.shape[1])
  kv_chunks = (pad_chunks(attn_k, s_chunk), pad_chunks(idx_k, s_chunk),
               pad_chunks(kv_positions, s_chunk, PAD_POSITION), pad_chunks(kv_segment_ids, s_chunk))
  q_chunks = tuple(pad_chunks(x, t_chunk) for x in (attn_q, attn_lse, idx_q, idx_w, q_positions, q_segment_ids))
  kl = jax.lax.map(functools.partial(_dense_query_chunk, attn_scale=attn_scale, kv_chunks=kv_chunks), q_chunks)
  return unchunk(kl, T)


def sparse_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, indices, *, q_positions, kv_positions,
              q_segment_ids, kv_segment_ids, t_chunk: int) -> jax.Array:
  """Sparse-stage KL per query [B, T] over `indices` [B, T, K]; arguments as `api.sparse_kl`."""
  T = attn_q.shape[1]  # noqa: N806
  take = jax.vmap(lambda x, i: x[i])  # per batch: [S, ...][t, K] -> [t, K, ...]
  # Gathered from a float32 copy and cast back, so the forward is unchanged and d idx_k accumulates in float32.
  idx_k32 = idx_k.astype(jnp.float32)

  @jax.checkpoint
  def query_chunk(args):
    q_chunk, lse_chunk, idx_q_chunk, idx_w_chunk, q_pos, q_seg, sel = args
    safe = jnp.where(sel >= 0, sel, 0)
    keep = ((sel >= 0) & (take(kv_positions, safe) <= q_pos[..., None])
            & (take(kv_segment_ids, safe) == q_seg[..., None]))
    attn_logits = jnp.einsum("btnc,btkc->btnk", q_chunk, take(attn_k, safe),
                             preferred_element_type=jnp.float32) * attn_scale
    logits = jnp.einsum("btih,btkh->btik", idx_q_chunk, take(idx_k32, safe).astype(idx_k.dtype),
                        preferred_element_type=jnp.float32)
    scores = jnp.einsum("btik,bti->btk", jax.nn.relu(logits), idx_w_chunk.astype(jnp.float32))
    return reference.kl_from_scores(attn_logits, lse_chunk, scores, keep)

  t_chunk = min(t_chunk, T)
  chunks = tuple(pad_chunks(x, t_chunk) for x in (attn_q, attn_lse, idx_q, idx_w, q_positions, q_segment_ids,
                                                    indices))
  return unchunk(jax.lax.map(query_chunk, chunks), T)


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
