"""Grouped matmul (forward and dgrad) whose tile schedule is built in XLA (DeepSeek-V3 routed experts, paper
section 2.1 of V3: 256 experts, 8 active).

The kernel jax ships (`ragged_dot_mgpu.ragged_dot`, `kernel.gmm`'s "bundled" choice) finds the group of each
row block inside the kernel with a loop unrolled over all G groups: a chain of dependent scalar operations per
output tile, G = 256 long for DeepSeek, which bounds the passes with a short contraction (K = 2048: the down
projection's forward, the up projection's dgrad).

Here `tile_schedule` (a few small XLA ops per call) lists every (group, row block) pair that owns rows, as
[max_tiles, 4] int32 rows (group, row block, first row inside the block, rows); the kernel only reads its tile's
row. Every SM loops over tiles (persistent, `plgpu.nd_loop`), in the planar-snake order of `grid_block_n`
column panels, so that the SMs running at once share weight panels and row blocks in L2. Per tile: a
multi-buffered pipeline of TMA loads and wgmma over K, then the tile's rows of its group go out through a
ladder of power-of-two TMA stores (a row block shared by two groups is computed once for each; each writes
only its rows). Rows past sum(group_sizes) form a last pseudo-group whose tiles skip the matmul and store
zeros, as `reference.grouped_matmul` defines them. A load buffer is refilled only one step after the wgmma that
read it was issued (`delay_release=1`), since wgmma runs asynchronously; GPU interpret mode runs it synchronously
and cannot show a missing delay.
Today: 460-494 TFLOP/s (forward, dgrad) at 256 experts x 512 rows on an H200 (benchmarks/moe_gmm.md).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

NUM_SMS = 132  # H100 / H200 SXM: the persistent grid when the device does not report its SM count


def _num_sms() -> int:
  """The SM count of the first device (a GPU reports `core_count`); NUM_SMS elsewhere (CPU cross-lowering)."""
  return getattr(jax.devices()[0], "core_count", None) or NUM_SMS


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int) -> jax.Array:
  """int32 [cdiv(m, block_m) + G, 4]: (group, row block, first row in the block, rows) of every (group, row
  block) pair with rows, in row order; then rows = 0. Group G is the pseudo-group of rows past sum(group_sizes).

  The pairs number at most cdiv(m, block_m) + G: the G + 1 groups partition m rows, and each group boundary
  inside a block adds one pair.
  """
  g = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  sizes = jnp.concatenate([sizes, jnp.maximum(m - sizes.sum(), 0)[None]])
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first_block = starts // block_m
  blocks = jnp.where(sizes > 0, (ends - 1) // block_m - first_block + 1, 0)
  cum = jnp.cumsum(blocks)
  tiles = jnp.arange(-(-m // block_m) + g, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(cum, tiles, side="right"), g).astype(jnp.int32)
  block = first_block[group] + tiles - (cum[group] - blocks[group])
  lo = jnp.maximum(starts[group], block * block_m)
  hi = jnp.minimum(ends[group], (block + 1) * block_m)
  valid = tiles < cum[-1]
  rows = jnp.where(valid, hi - lo, 0)
  return jnp.stack([group, jnp.where(valid, block, 0), jnp.where(valid, lo - block * block_m, 0), rows], axis=-1)


def _store_rows(o_smem, out_ref, block_row: jax.Array, first: jax.Array, rows: jax.Array, col, block_m: int):
  """TMA-stores rows [first, first + rows) of o_smem to out_ref rows block_row + first..., columns col.

  A TMA store has a static box, so the row count is written in binary: one store of 2^i rows per set bit."""
  offset = first
  size = block_m
  while size:
    @pl.when(rows & size != 0)
    def _store(size=size, offset=offset):
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, size)], out_ref.at[pl.ds(block_row + offset, size), col])

    offset = offset + (rows & size)
    size //= 2


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_w: bool = False,
        block_m: int = 128, block_n: int = 128, block_k: int = 64, max_concurrent_steps: int = 4,
        grid_block_n: int = 1, num_sms: int | None = None, interpret=None) -> jax.Array:
  """x [M, D] (M % block_m == 0, D % block_k == 0), w [G, D, N] (or [G, N, D] with transpose_w; N % block_n
  == 0) -> [M, N]: the rows of group e times w[e], zeros for rows past sum(group_sizes), which must not exceed
  M (as for `lax.ragged_dot`).

  block_m x block_n output tiles (block_m a power of two), block_k contraction steps, max_concurrent_steps load
  buffers (`kernel.Tiles` passes its own). grid_block_n: column panel width (in tiles) of the planar-snake tile
  order; must divide N / block_n.
  num_sms: CTAs of the persistent grid (None: the device's SM count).
  """
  m, d = x.shape
  g = w.shape[0]
  n = w.shape[1] if transpose_w else w.shape[2]
  bm, bn, bk = block_m, block_n, block_k
  if m % bm or d % bk or n % bn:
    raise ValueError(f"x [{m}, {d}] and w's output width {n} must be multiples of block_m={bm}, block_k={bk} "
                     f"and block_n={bn} (kernel.gmm pads).")
  if bm & (bm - 1):
    raise ValueError(f"block_m={bm} must be a power of two (the row stores write the row count in binary).")
  if (n // bn) % grid_block_n:
    raise ValueError(f"grid_block_n={grid_block_n} must divide the {n // bn} column tiles.")
  schedule = tile_schedule(group_sizes, m, bm)
  grid_m, grid_n = schedule.shape[0], n // bn

  def body(schedule_ref, x_ref, w_ref, out_ref):
    @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
    def _tile(loop_info):
      mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1, grid_block_n)
      group, block, first, rows = (schedule_ref[mi, c] for c in range(4))

      @pl.when(rows > 0)
      def _owned():
        def products(acc_ref):
          @pl.when(group < g)  # the pseudo-group of unassigned rows stores zeros
          def _matmul():
            # delay_release=1: a buffer is refilled one step after its wgmma was issued, which runs async.
            w_spec = (plgpu.BlockSpec((bn, bk), lambda k: (ni, k), delay_release=1) if transpose_w
                      else plgpu.BlockSpec((bk, bn), lambda k: (k, ni), delay_release=1))
            plgpu.emit_pipeline(
                lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem,
                                                      w_smem.transpose((1, 0)) if transpose_w else w_smem),
                grid=(d // bk,),
                in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (block, k), delay_release=1), w_spec],
                max_concurrent_steps=max_concurrent_steps,
            )(x_ref, w_ref.at[jnp.minimum(group, g - 1)])
          return acc_ref[...]

        acc = pl.run_scoped(products, plgpu.ACC((bm, bn)))

        def store(o_smem):
          o_smem[...] = acc.astype(o_smem.dtype)
          plgpu.commit_smem()
          _store_rows(o_smem, out_ref, block * bm, first, rows, pl.ds(ni * bn, bn), bm)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        pl.run_scoped(store, plgpu.SMEM((bm, bn), out_ref.dtype))

  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )(schedule, x, w.astype(x.dtype))
