"""Placeholder jnp references of the decode kernels of issue 23, with the signatures of the decode contract.

`sparse_mla_decode` / `dense_mla_decode` (to be `pallas_kernels.mla_decode.api`) and `index_decode_topk` (to be
`pallas_kernels.index_decode.api`) are written by other helpers beside their Mosaic GPU kernels. Until those
land, `paged_cache` calls these references through the same signatures; at the merge this module is deleted
and `paged_cache` imports the two `api` modules instead. Only "xla" exists here: "pallas" raises.

Each reference gathers the rows it reads ([Q, K or S, C + R] float32), so its memory grows with the rows
times the keys: a spec for tests and small runs, not a decoder for 128K contexts.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation

AVAILABLE = ("xla",)


def _resolve(implementation: str | None) -> None:
  resolve_implementation(implementation, AVAILABLE)


def dequantize(values: jax.Array, scale: jax.Array | None) -> jax.Array:
  """values [..., C] (e4m3 or a float dtype), scale [..., C / tile] float32 or None -> float32 [..., C]."""
  x = values.astype(jnp.float32)
  if scale is None:
    return x
  tiles = scale.shape[-1]
  return (x.reshape(*x.shape[:-1], tiles, -1) * scale[..., None].astype(jnp.float32)).reshape(x.shape)


def visible_rows(block_table: jax.Array, lengths: jax.Array, page_size: int) -> jax.Array:
  """Physical pool rows [Q, max_pages * page_size] of logical positions 0.. per row; -1 at positions >= lengths
  and on unmapped pages (block table entry -1)."""
  s = jnp.arange(block_table.shape[1] * page_size, dtype=jnp.int32)
  pages = block_table[:, s // page_size]
  return jnp.where((s[None] < lengths[:, None]) & (pages >= 0), pages * page_size + s % page_size, -1)


def sparse_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                      indices: jax.Array, *, scale: float, num_splits: int | None = None,
                      implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """q [Q, N, C + R], pool rows kv_nope [Rp, C], kv_scale [Rp, C / tile] | None, kv_rope [Rp, R], indices [Q, K]
  physical rows (-1 skipped) -> (out [Q, N, C] in q's dtype, lse [Q, N] float32; 0 and -inf for a row with no
  key). Keys are the dequantised [c | k_rope], values c."""
  del num_splits  # the references run unsplit
  _resolve(implementation)
  valid = indices >= 0
  rows = jnp.where(valid, indices, 0)
  nope = dequantize(kv_nope[rows], None if kv_scale is None else kv_scale[rows])  # [Q, K, C]
  keys = jnp.concatenate([nope, kv_rope[rows].astype(jnp.float32)], axis=-1)
  logits = jnp.einsum("qnd,qkd->qnk", q.astype(jnp.float32), keys) * scale
  logits = jnp.where(valid[:, None], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("qnk,qkc->qnc", probs, nope)
  return out.astype(q.dtype), lse


def dense_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                     block_table: jax.Array, lengths: jax.Array, *, scale: float, page_size: int,
                     num_splits: int | None = None, implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Dense absorbed-MQA decode: row q sees logical positions 0..lengths[q]-1 through block_table [Q, max_pages]
  -> (out [Q, N, C], lse [Q, N]) as `sparse_mla_decode` over all of them."""
  return sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, visible_rows(block_table, lengths, page_size), scale=scale,
                           num_splits=num_splits, implementation=implementation)


def index_decode_topk(q: jax.Array, weights: jax.Array, idx_k: jax.Array, idx_scale: jax.Array | None,
                      block_table: jax.Array, lengths: jax.Array, *, k: int, page_size: int,
                      q_scale: jax.Array | None = None,
                      implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Indexer scores of decode rows fused with top-k -> (indices [Q, k] int32 logical positions, -1 where fewer
  than k are visible; scores [Q, k] float32, -inf there).

  score[s] = sum_j weights[j] relu(q[j] . k[s] q_scale[j] k_scale[s]) over the visible s < lengths; ties go to
  the lower position (`lax.top_k` is stable).
  """
  _resolve(implementation)
  rows = visible_rows(block_table, lengths, page_size)
  valid = rows >= 0
  safe = jnp.where(valid, rows, 0)
  keys = idx_k[safe].astype(jnp.float32)  # [Q, S, H]
  if idx_scale is not None:
    keys = keys * idx_scale[safe][..., None].astype(jnp.float32)
  w = weights.astype(jnp.float32) * (1.0 if q_scale is None else q_scale.astype(jnp.float32))
  logits = jnp.einsum("qih,qsh->qis", q.astype(jnp.float32), keys)
  scores = jnp.where(valid, jnp.einsum("qis,qi->qs", jax.nn.relu(logits), w), -jnp.inf)
  top, idx = jax.lax.top_k(scores, min(k, scores.shape[1]))
  idx = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
  pad = k - idx.shape[1]
  return (jnp.pad(idx, ((0, 0), (0, pad)), constant_values=-1),
          jnp.pad(top, ((0, 0), (0, pad)), constant_values=-jnp.inf))
