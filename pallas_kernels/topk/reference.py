"""Reference top-k selection: the contract every top-k implementation meets.

Exact top-k per row in float total order (-0.0 < +0.0); ties go to the lower key index; keys whose score is -inf
(not visible) are never selected and their slots hold -1; the selected indices come back sorted ascending, -1
padding last. Scores must not be NaN.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.topk import radix


def topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """scores [..., S] (-inf = not visible) -> int32 indices [..., min(k, S)]."""
  k = min(k, scores.shape[-1])
  # Selected on integer keys of the float order: XLA's GPU top-k over long rows compares floats, where -0.0 ==
  # +0.0, and would then break that tie by index. Stable: equal keys keep ascending index order.
  keys = jax.lax.bitcast_convert_type(radix.sortable_keys(scores) ^ jnp.uint32(1 << 31), jnp.int32)
  _, indices = jax.lax.top_k(keys, k)
  n = scores.shape[-1]
  indices = jnp.where(jnp.take_along_axis(scores, indices, axis=-1) == -jnp.inf, n, indices)
  indices = jnp.sort(indices, axis=-1)
  return jnp.where(indices == n, -1, indices).astype(jnp.int32)
