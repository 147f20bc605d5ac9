"""Reference grouped matmul: rows of `x` sorted by expert, one weight matrix per expert."""

import jax
import jax.numpy as jnp


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x [M, D] (rows grouped by expert), w [E, D, F], group_sizes [E] int32 -> [M, F]."""
  return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32).astype(x.dtype)
