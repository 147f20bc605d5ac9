"""Public entry point of the grouped matmul for routed experts."""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.moe_gmm import kernel
from pallas_kernels.moe_gmm import reference

AVAILABLE = ("xla", "pallas")


@jax.custom_vjp
def _pallas_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return kernel.gmm(x, w, group_sizes)


def _pallas_gmm_fwd(x, w, group_sizes):
  return kernel.gmm(x, w, group_sizes), (x, w, group_sizes)


def _pallas_gmm_bwd(res, dy):
  """dx = dy @ w[e].T per group (dgrad), dw[e] = x[e].T @ dy[e] (wgrad); group sizes get no cotangent."""
  x, w, group_sizes = res
  dx = kernel.gmm(dy, w, group_sizes, transpose_w=True)
  dw = kernel.tgmm(x, dy, group_sizes)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_pallas_gmm.defvjp(_pallas_gmm_fwd, _pallas_gmm_bwd)


@functools.partial(jax.jit, static_argnames=("implementation",))
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str | None = None) -> jax.Array:
  """x [M, D] rows sorted by expert, w [E, D, F], group_sizes [E] -> [M, F]."""
  supported = x.dtype in (jnp.bfloat16, jnp.float16)  # the imported Hopper kernels take 16-bit inputs
  if resolve_implementation(implementation, AVAILABLE, supported) == "pallas":
    return _pallas_gmm(x, w.astype(x.dtype), group_sizes.astype(jnp.int32))
  return reference.grouped_matmul(x, w, group_sizes)
