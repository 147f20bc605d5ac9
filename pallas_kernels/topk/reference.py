"""Reference top-k selection: the contract every top-k implementation meets.

Exact top-k per row; ties go to the lower key index; keys whose score is -inf (not visible) are never
selected and their slots hold -1; the selected indices come back sorted ascending, -1 padding last.
"""

import jax
import jax.numpy as jnp


def topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """scores [..., S] (-inf = not visible) -> int32 indices [..., min(k, S)]."""
  k = min(k, scores.shape[-1])
  values, indices = jax.lax.top_k(scores, k)  # stable: equal values keep ascending index order
  n = scores.shape[-1]
  indices = jnp.where(values == -jnp.inf, n, indices)
  indices = jnp.sort(indices, axis=-1)
  return jnp.where(indices == n, -1, indices).astype(jnp.int32)
