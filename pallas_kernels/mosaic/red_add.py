"""Scatter-add of a wgmma accumulator into selected rows of a float32 GMEM array with `red.global.add.v2.f32`
(Mosaic GPU, inline).

The TMA alternative (`copy_smem_to_gmem(..., reduction_op="add")`, used by the sparse MLA and indexer-KL
backward kernels) needs the accumulator staged in SMEM and one bulk copy per row and 64-column slab, issued by
a few threads, and the staging buffer stays busy until the TMA unit has read it. Here every thread of the
warpgroup adds its own accumulator fragments from registers: in the wgmma layout a thread holds pairs of
adjacent columns of two rows (r, r + 8) per 8 columns; neighbouring lanes first swap halves, so that each thread
issues 8 four-float (16-byte) reductions per 64 x 64 float32 slab. Nothing is staged and nothing is
awaited: `red` returns no value, and the writes are visible to later kernels.

Both arguments must have the wgmma layout (`plgpu.Layout.WGMMA`, vectors of 2): `rows` [M, N] int32 holds
each element's destination row (a broadcast of the per-row indices, so its registers line up with the
accumulator's), `acc` [M, N] float32 the values. Additions are atomic per element; their order, hence the
rounding, varies run to run. Pallas GPU interpret mode cannot run inline Mosaic GPU code: the kernels that use
this are checked by cross-lowering on CPU and by the GPU benchmarks.
"""

import numpy as np
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, vector

_RED_V4 = "red.global.add.v4.f32 [$0], {$1, $2, $3, $4};"


def _extract(vec: ir.Value, i: int) -> ir.Value:
  return vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))


def _static_offsets(fa) -> dict[tuple[int, ...], tuple[int, int]]:
  """(row, column) of each register of a 2-D FragmentedArray relative to the thread's first one (static)."""
  strides = mgpu_utils.get_contiguous_strides(fa.shape)
  tile_strides = fa.layout.tiling.tile_strides(strides)
  return {reg: divmod(sum(i * s for i, s in zip(reg, tile_strides)), fa.shape[1])
          for reg in np.ndindex(fa.registers.shape)}


def add_rows(dst, rows, acc, *, col: int) -> None:
  """Warpgroup code: dst[rows[r, c], col + c] += acc[r, c] for every element of acc.

  dst: GMEM ref [S, D] float32 (contiguous rows, D a multiple of 4); rows: int32 [M, N] and acc: float32
  [M, N], both in the wgmma layout; col: static column offset of acc in dst (a multiple of 4, col + N <= D).
  Rows must be valid (>= 0). Lanes 2i and 2i + 1, which hold columns 4m..4m+1 and 4m+2..4m+3 of rows r and
  r + 8, swap halves with one butterfly shuffle, so that the even lane adds 4 columns of row r and the odd lane
  4 of row r + 8: 16-byte reductions (2-float ones, each thread its own fragments, measured 5-13% slower on
  the H200 and were removed).
  """

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WGMMA, plgpu.Layout.WGMMA))
  def _add(_, dst_ref, rows_fa, acc_fa):
    for name, fa in (("rows", rows_fa), ("acc", acc_fa)):
      if fa.layout != mgpu_fa.WGMMA_LAYOUT:
        raise ValueError(f"{name} must have the wgmma layout (vectors of 2), got {fa.layout}.")
    if rows_fa.shape != acc_fa.shape:
      raise ValueError(f"rows {rows_fa.shape} and acc {acc_fa.shape} must have one shape.")
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    row_width = ir.MemRefType(dst_ref.type).shape[-1]
    base = llvm.ptrtoint(i64, llvm.addrspacecast(llvm.PointerType.get(address_space=1),
                                                 mgpu_utils.memref_ptr(dst_ref)))
    void = ir.Type.parse("!llvm.void")
    regs = list(np.ndindex(acc_fa.registers.shape))
    idxs = dict(zip(regs, acc_fa.layout.thread_idxs(acc_fa.shape), strict=True))

    def address(reg, column_shift=0):
      row = arith.extui(i64, _extract(rows_fa.registers[reg], 0))
      column = arith.addi(arith.index_castui(i64, idxs[reg][1]), arith.constant(i64, col + column_shift))
      element = arith.addi(arith.muli(row, arith.constant(i64, row_width)), column)
      return arith.addi(base, arith.muli(element, arith.constant(i64, 4)))

    offsets = _static_offsets(acc_fa)
    by_offset = {offset: reg for reg, offset in offsets.items()}
    odd = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(mgpu_utils.thread_idx(), arith.constant(i32, 1)),
                     arith.constant(i32, 0))
    for lo, (dr, dc) in offsets.items():
      if dr % 16 >= 8:  # the row r + 8 half of a pair, handled with its row r register
        continue
      hi = by_offset[dr + 8, dc]
      own_lo, own_hi = acc_fa.registers[lo], acc_fa.registers[hi]
      received = mgpu_utils.shfl_bfly(arith.select(odd, own_lo, own_hi), 1)  # partner's row r (odd: r + 8)
      first = arith.select(odd, received, own_lo)  # even: own row r cols c, c + 1; odd: partner's row r + 8
      second = arith.select(odd, own_hi, received)
      addr = arith.select(odd, address(hi, -2), address(lo))
      values = [_extract(first, 0), _extract(first, 1), _extract(second, 0), _extract(second, 1)]
      llvm.inline_asm(void, [addr, *values], _RED_V4, "l,f,f,f,f", has_side_effects=True)

  _add(dst, rows, acc)
