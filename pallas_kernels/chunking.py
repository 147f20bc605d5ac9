"""Splitting [B, L, ...] arrays into chunks for the chunked XLA loops (indexer KL, indexer top-k, sparse MLA)."""

import jax
import jax.numpy as jnp

PAD_POSITION = jnp.iinfo(jnp.int32).max  # padded keys are later than every query


def pad_chunks(x: jax.Array, chunk: int, value=0) -> jax.Array:
  """[B, L, ...] -> [L_pad // chunk, B, chunk, ...] (chunk-major, for lax.map / lax.scan)."""
  pad = -x.shape[1] % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)


def unchunk(x: jax.Array, length: int) -> jax.Array:
  """[L_pad // chunk, B, chunk, ...] -> [B, length, ...]: the inverse of `pad_chunks`."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :length]


def visible_block_ranges(q_positions, kv_positions, q_segment_ids, kv_segment_ids, block: int) -> jax.Array:
  """int32 [B, T, 2]: per query the first and one-past-last key block of `block` keys holding a visible key
  ((0, 0) if none).

  Keys must be padded to a multiple of `block`. A fused compare-and-reduce over [T, S / block]; blocks inside
  the range that hold no visible key are still visited (and masked), which for packed causal documents never
  happens.
  """
  b, s = kv_positions.shape
  blocks = lambda x: x.reshape(b, s // block, block)
  min_pos = blocks(kv_positions).min(-1)[:, None, :]
  min_seg = blocks(kv_segment_ids).min(-1)[:, None, :]
  max_seg = blocks(kv_segment_ids).max(-1)[:, None, :]
  qp, qs = q_positions[..., None], q_segment_ids[..., None]
  live = (min_pos <= qp) & (min_seg <= qs) & (max_seg >= qs)
  j = jnp.arange(s // block, dtype=jnp.int32)
  hi = jnp.where(live, j + 1, 0).max(-1)
  lo = jnp.minimum(jnp.where(live, j, s // block).min(-1), hi)
  return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)
