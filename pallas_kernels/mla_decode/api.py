"""Public entry points of MLA decoding over the paged latent cache (the decode contract of issue 23).

sparse_mla_decode: each query row against its K selected pool rows. dense_mla_decode: against every visible row
(positions 0 .. lengths - 1 through the block table), the dense baseline. Query rows are B * Tq rows (Tq = 1 for plain
decoding, 2 for MTP verification); heads N of the absorbed query (any N; the kernel pads to 64-head tiles).

"pallas": `kernel` (the sparse MLA forward kernel over pool rows, split-K, XLA merge); None picks it on a GPU for a
bf16 or FP8 cache of its widths (`kernel.supports`), else "xla": the float32 reference (`reference`), over the same
split-K parts and merge when the gathered rows of all parts at once would exceed XLA_SPLIT_BYTES (dense decoding at
long contexts).
num_splits=None: `split_k.default_num_splits` for the kernel, the memory rule above for XLA.
"""

import jax
import jax.numpy as jnp
from jax import lax

import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.mla_decode import kernel, reference, split_k
from pallas_kernels.sparse_mla.kernel_fwd import HEAD_TILE

AVAILABLE = ("xla", "pallas")
XLA_SPLIT_BYTES = 2**28  # the XLA path's float32 gathered rows and logits per part stay under this


def _check(q, kv_nope, kv_scale, kv_rope, rows_per_query: tuple[int, ...], what: str) -> None:
  """One-line errors naming the tensor, its shape or dtype and what is allowed."""
  c, r = kv_nope.shape[-1], kv_rope.shape[-1]
  if q.ndim != 3 or q.shape[-1] != c + r:
    raise ValueError(f"mla_decode.api: q has shape {q.shape}; allowed: [Q, N, C + R] = [Q, N, {c + r}].")
  if kv_nope.ndim != 2 or kv_rope.shape != (kv_nope.shape[0], r):
    raise ValueError(f"mla_decode.api: kv_nope {kv_nope.shape} and kv_rope {kv_rope.shape}; allowed: [rows, C] and "
                     "[rows, R] of one pool.")
  fp8 = kv_nope.dtype == jnp.float8_e4m3fn
  tiles = max(c // 128, 1)
  if fp8 != (kv_scale is not None) or (fp8 and kv_scale.shape != (kv_nope.shape[0], tiles)):
    raise ValueError(f"mla_decode.api: kv_nope {kv_nope.dtype} with kv_scale "
                     f"{None if kv_scale is None else kv_scale.shape}; allowed: float8_e4m3fn with kv_scale "
                     f"[{kv_nope.shape[0]}, {tiles}], or bf16 with kv_scale None.")
  if rows_per_query[0] != q.shape[0]:
    raise ValueError(f"mla_decode.api: {what} has {rows_per_query[0]} rows; allowed: one per query row "
                     f"(Q = {q.shape[0]}).")


def _xla_splits(q, keys: int) -> int:
  rows, heads, d = q.shape
  per_key = rows * (2 * d * 4 + 3 * heads * 4)  # float32 keys and latent, logits and probabilities
  return max(1, -(-keys * per_key // XLA_SPLIT_BYTES))


def _xla(q, kv_nope, kv_scale, kv_rope, indices, scale, num_splits):
  num_splits = num_splits or _xla_splits(q, indices.shape[-1])
  if num_splits == 1:
    out, lse = reference.sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, indices, scale=scale)
    return out.astype(q.dtype), lse
  parts = split_k.split_indices(indices, num_splits).reshape(q.shape[0], num_splits, -1)
  out, lse = lax.map(lambda idx: reference.sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, idx, scale=scale),
                     jnp.moveaxis(parts, 1, 0))
  out, lse = split_k.merge(jnp.moveaxis(out, 0, 1), jnp.moveaxis(lse, 0, 1))
  return out.astype(q.dtype), lse


def sparse_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                      indices: jax.Array, *, scale: float, num_splits: int | None = None,
                      implementation: str | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """q [Q, N, C + R], kv_nope [rows, C] (fp8 or bf16), kv_scale [rows, C / 128] float32 | None, kv_rope [rows, R],
  indices [Q, K] int32 pool rows (-1 = skip) -> (out [Q, N, C] in q's dtype, lse [Q, N] float32; out 0 and lse -inf
  for a row with no valid index). `interpret`: the Pallas kernel in GPU interpret mode (CPU tests)."""
  _check(q, kv_nope, kv_scale, kv_rope, indices.shape, "indices")
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"mla_decode.api: num_splits={num_splits}; allowed: a positive int or None.")
  supported = kernel.supports(q, kv_nope, kv_scale, kv_rope)
  if resolve_implementation(implementation, AVAILABLE, supported) == "pallas":
    head_tiles = -(-q.shape[1] // HEAD_TILE)
    num_splits = num_splits or split_k.default_num_splits(q.shape[0], indices.shape[-1], head_tiles)
    return kernel.sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, indices, scale=scale, num_splits=num_splits,
                                    interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else False)
  return _xla(q, kv_nope, kv_scale, kv_rope, indices, scale, num_splits)


def dense_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                     block_table: jax.Array, lengths: jax.Array, *, scale: float, page_size: int,
                     num_splits: int | None = None, implementation: str | None = None,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """`sparse_mla_decode` over every visible row: block_table [Q, max_pages] int32 pages of the pool (viewed as
  [pages, page_size] rows), lengths [Q] int32 keys visible to each row (logical positions 0 .. lengths - 1)."""
  _check(q, kv_nope, kv_scale, kv_rope, block_table.shape, "block_table")
  if lengths.shape != (q.shape[0],) or kv_nope.shape[0] % page_size:
    raise ValueError(f"mla_decode.api: lengths {lengths.shape} with pool rows {kv_nope.shape[0]} and page_size="
                     f"{page_size}; allowed: lengths [{q.shape[0]}] and pool rows a multiple of page_size.")
  rows = reference.dense_rows(block_table, lengths, page_size=page_size)
  return sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, rows, scale=scale, num_splits=num_splits,
                           implementation=implementation, interpret=interpret)
