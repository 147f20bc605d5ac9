"""Public entry point of the grouped matmul for routed experts."""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.moe_gmm import reference

AVAILABLE = ("xla",)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str | None = None) -> jax.Array:
  """x [M, D] rows sorted by expert, w [E, D, F], group_sizes [E] -> [M, F]."""
  resolve_implementation(implementation, AVAILABLE)
  return reference.grouped_matmul(x, w, group_sizes)
