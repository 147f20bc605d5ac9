"""Which keys a query may see: causal order and document (segment) boundaries.

Every kernel takes positions and segment ids instead of a mask, so the same code serves packed training
sequences, decoding against a cache and context-parallel shards (where keys are not 0..S-1).
Key s is visible to query t iff kv_positions[s] <= q_positions[t] and kv_segment_ids[s] == q_segment_ids[t].
"""

import jax
import jax.numpy as jnp

PAD_POSITION = jnp.iinfo(jnp.int32).max  # the position of a padding key: later than every query, never visible


def visible(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
            kv_segment_ids: jax.Array) -> jax.Array:
  """[B, T] x [B, S] positions and segment ids -> boolean [B, T, S]."""
  causal = kv_positions[:, None, :] <= q_positions[:, :, None]
  same_doc = kv_segment_ids[:, None, :] == q_segment_ids[:, :, None]
  return causal & same_doc


def visible_block_ranges(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                         kv_segment_ids: jax.Array, block: int) -> jax.Array:
  """int32 [B, T, 2]: per query the first and one-past-last key block of `block` keys holding a visible key
  ((0, 0) if none), so that kernels and chunked loops can skip the blocks outside.

  Keys must be padded to a multiple of `block` (with PAD_POSITION). A fused compare-and-reduce over [T, S / block];
  blocks inside the range that hold no visible key are still visited (and masked), which for packed causal
  documents never happens.
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
