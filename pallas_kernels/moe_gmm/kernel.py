"""Grouped matmul for routed experts on Hopper, built on the Mosaic GPU kernels shipped inside jax and ours.

Forward and dgrad use `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot` ("bundled": rows grouped by
expert; dgrad multiplies by the transposed expert weights) or our `kernel_scheduled` ("scheduled": same tiles, the
group of each tile looked up in a schedule built in XLA); wgrad uses
`jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu.transposed_ragged_dot` (contraction over the grouped
rows). This module pads shapes to the kernels' tile constraints and chooses kernels and tiles.

The bundled kernel searches all G groups for each output tile, a cost that grows with G; ours pays a few small XLA
ops per call instead. So "auto" takes ours from SCHEDULED_MIN_GROUPS groups (it won with 256 experts on one device)
and jax's below (it won with the 32 local experts of 8-way expert parallelism); between 32 and 256 groups the choice
is not measured. Limits: 16-bit inputs; the wgrad kernel still searches all groups per tile.
Today: 400-510 TFLOP/s at 512 and more rows per expert, 150-260 at 128 (H200; benchmarks/moe_gmm.md).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

from pallas_kernels.moe_gmm import kernel_scheduled

# Kernels of the forward and dgrad: "auto" picks "scheduled" from SCHEDULED_MIN_GROUPS groups, else "bundled".
GMM_KERNELS = ("auto", "bundled", "scheduled")
SCHEDULED_MIN_GROUPS = 64
# The kernels' TMA copies tile rows by 8 (bf16 tiles of (8, 64)): a row count over 8 must be a multiple of it, so
# the rows are padded with zeros, which belong to no group (they lie past sum(group_sizes)).
ROW_MULTIPLE = 8


def resolve_gmm_kernel(gmm_kernel: str, num_groups: int) -> str:
  """"bundled" or "scheduled" for `Tiles.gmm_kernel` and the number of groups (experts)."""
  if gmm_kernel not in GMM_KERNELS:
    raise ValueError(f"tiles.gmm_kernel={gmm_kernel!r} must be one of {GMM_KERNELS}.")
  if gmm_kernel == "auto":
    return "scheduled" if num_groups >= SCHEDULED_MIN_GROUPS else "bundled"
  return gmm_kernel


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes of the kernels (block_k is the contraction tile) and the forward / dgrad kernel (GMM_KERNELS). The
  defaults were the best or within 9% of the best tiles of a sweep on the H200 (`bench.py`, "moe_gmm_tiles")."""
  gmm_kernel: str = "auto"
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  wgrad_block_m: int = 128
  wgrad_block_n: int = 128
  wgrad_block_k: int = 64
  wgrad_max_concurrent_steps: int = 4


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _grid_block_n(n: int, block_n: int) -> int:
  """Largest panel width (in tiles) of the planar-snake schedule that divides the N tiles."""
  tiles = n // block_n
  return next(g for g in (8, 4, 2, 1) if tiles % g == 0)


def _zero_unassigned_rows(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """ragged_dot leaves rows past sum(group_sizes) unwritten; the reference defines them as zeros."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (out.shape[0], 1), 0)
  return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_w: bool = False,
        tiles: Tiles = Tiles()) -> jax.Array:
  """x [M, D], w [E, D, F] (or [E, F, D] with transpose_w) -> [M, F]: rows of group e times w[e]."""
  gmm_kernel = resolve_gmm_kernel(tiles.gmm_kernel, w.shape[0])
  m = x.shape[0]
  f = w.shape[1] if transpose_w else w.shape[2]
  x = _pad_axis(x, 1, tiles.block_k)
  w = _pad_axis(w, 2 if transpose_w else 1, tiles.block_k)
  w = _pad_axis(w, 1 if transpose_w else 2, tiles.block_n)
  n = w.shape[1] if transpose_w else w.shape[2]
  if gmm_kernel == "scheduled":
    out = kernel_scheduled.gmm(
        _pad_axis(x, 0, tiles.block_m), w, group_sizes.astype(jnp.int32), transpose_w=transpose_w,
        block_m=tiles.block_m, block_n=tiles.block_n, block_k=tiles.block_k,
        max_concurrent_steps=tiles.max_concurrent_steps, grid_block_n=_grid_block_n(n, tiles.block_n))
    return out[:m, :f]  # rows past sum(group_sizes) are zeros already
  out = ragged_dot_mgpu.ragged_dot(
      _pad_axis(x, 0, ROW_MULTIPLE), w.astype(x.dtype), group_sizes=group_sizes.astype(jnp.int32),
      block_m=tiles.block_m, block_n=tiles.block_n, block_k=tiles.block_k,
      max_concurrent_steps=tiles.max_concurrent_steps, grid_block_n=_grid_block_n(n, tiles.block_n),
      transpose_rhs=transpose_w)
  return _zero_unassigned_rows(out[:m, :f], group_sizes)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, tiles: Tiles = Tiles()) -> jax.Array:
  """x [M, D], dy [M, F] -> [E, D, F]: per group e, x[rows of e].T @ dy[rows of e] (the weight gradient)."""
  d, f = x.shape[1], dy.shape[1]
  x = _pad_axis(_pad_axis(x, 1, tiles.wgrad_block_m), 0, ROW_MULTIPLE)
  dy = _pad_axis(_pad_axis(dy.astype(x.dtype), 1, tiles.wgrad_block_n), 0, ROW_MULTIPLE)
  out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x, dy, group_sizes=group_sizes.astype(jnp.int32), block_m=tiles.wgrad_block_m,
      block_n=tiles.wgrad_block_n, block_k=tiles.wgrad_block_k,
      max_concurrent_steps=tiles.wgrad_max_concurrent_steps,
      grid_block_n=_grid_block_n(dy.shape[1], tiles.wgrad_block_n))
  return out[:, :d, :f]
