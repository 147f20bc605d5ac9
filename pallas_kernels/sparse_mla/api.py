"""Public entry point of sparse MLA attention."""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.sparse_mla import reference

AVAILABLE = ("xla",)


def sparse_mla(q: jax.Array, kv: jax.Array, indices: jax.Array, *, scale: float, v_dim: int,
               implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Dk], kv [B, S, Dk], indices [B, T, K] -> (out [B, T, N, v_dim], lse [B, T, N])."""
  resolve_implementation(implementation, AVAILABLE)
  return reference.sparse_mla(q, kv, indices, scale=scale, v_dim=v_dim)
