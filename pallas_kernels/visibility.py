"""Which keys a query may see: causal order and document (segment) boundaries.

Every kernel takes positions and segment ids instead of a mask, so the same code serves packed training
sequences, decoding against a cache and context-parallel shards (where keys are not 0..S-1).
Key s is visible to query t iff kv_positions[s] <= q_positions[t] and kv_segment_ids[s] == q_segment_ids[t].
"""

import jax
import jax.numpy as jnp


def visible(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
            kv_segment_ids: jax.Array) -> jax.Array:
  """[B, T] x [B, S] positions and segment ids -> boolean [B, T, S]."""
  causal = kv_positions[:, None, :] <= q_positions[:, :, None]
  same_doc = kv_segment_ids[:, None, :] == q_segment_ids[:, :, None]
  return causal & same_doc
