"""Public entry point of top-k selection."""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.topk import reference

AVAILABLE = ("xla",)


def topk_indices(scores: jax.Array, k: int, implementation: str | None = None) -> jax.Array:
  """scores [..., S] (-inf = not visible) -> int32 [..., min(k, S)] sorted ascending, -1 padded."""
  resolve_implementation(implementation, AVAILABLE)
  return reference.topk_indices(scores, k)
