"""Public entry point of sparse MLA attention.

"pallas": the Mosaic GPU forward kernel (`kernel_fwd`) under a custom_vjp whose backward is the Mosaic GPU kernel
of `kernel_bwd` (recompute from the saved logsumexp, dkv by atomic TMA reduce-adds), or with `deterministic=True`
the chunked XLA computation of `chunked_bwd` (a fixed summation order). "xla": `chunked` (the reference in
blocks of query rows, backward by `chunked_bwd`). None picks by backend (`dispatch.resolve_implementation`).
"""

import functools

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.sparse_mla import chunked
from pallas_kernels.sparse_mla import chunked_bwd
from pallas_kernels.sparse_mla import kernel_bwd
from pallas_kernels.sparse_mla import kernel_fwd

AVAILABLE = ("xla", "pallas")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _pallas_sparse_mla(q, kv, indices, scale, v_dim, deterministic, interpret):
  return _pallas_fwd(q, kv, indices, scale, v_dim, deterministic, interpret)[0]


def _interpret_params(interpret):
  return plgpu.InterpretGPUParams(detect_races=True) if interpret else False


def _pallas_fwd(q, kv, indices, scale, v_dim, deterministic, interpret):
  del deterministic
  out, lse = kernel_fwd.sparse_mla_fwd(q, kv, indices, scale=scale, v_dim=v_dim, interpret=_interpret_params(interpret))
  return (out, lse), (q, kv, indices, out, lse)


def _pallas_bwd(scale, v_dim, deterministic, interpret, res, cotangents):
  q, kv, indices, out, lse = res
  dout, dlse = cotangents
  if deterministic:
    dq, dkv = chunked_bwd.sparse_mla_bwd(q, kv, indices, out, lse, dout, dlse, scale=scale, v_dim=v_dim)
  else:
    dq, dkv = kernel_bwd.sparse_mla_bwd(q, kv, indices, out, lse, dout, dlse, scale=scale, v_dim=v_dim,
                                        interpret=_interpret_params(interpret))
  return dq, dkv, None


_pallas_sparse_mla.defvjp(_pallas_fwd, _pallas_bwd)


def sparse_mla(q: jax.Array, kv: jax.Array, indices: jax.Array, *, scale: float, v_dim: int,
               implementation: str | None = None, deterministic: bool = False,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Dk], kv [B, S, Dk], indices [B, T, K] (-1 = skip) -> (out [B, T, N, v_dim], lse [B, T, N]).

  `deterministic` makes the Pallas path's backward use the chunked XLA computation, whose dkv
  scatter-add has a fixed order (the kernel's atomic reduce-adds do not); `interpret` runs the Pallas
  kernels in GPU interpret mode (CPU tests).
  """
  supported = kernel_fwd.supports(q.shape[-1], v_dim, q.dtype)
  if resolve_implementation(implementation, AVAILABLE, supported) == "pallas":
    return _pallas_sparse_mla(q, kv, indices, float(scale), v_dim, deterministic, interpret)
  return chunked.sparse_mla(q, kv, indices, scale=scale, v_dim=v_dim)
