"""Row scatter-add of a staged SMEM slab into a float32 GMEM array with one non-tensor bulk reduction per row,
each issued by its own thread (Mosaic GPU, inline).

The TMA reduce-adds of the backward kernels (`copy_smem_to_gmem(..., reduction_op="add")`) are tensor copies:
one per selected row and slab, issued from one lane of each of a few warps (`row_copies`), so a 64-row slab
takes 16 serial issues per warp. Issuing them from 2 warps instead of 4 made the sparse MLA backward 1.34x
slower on the H200 (benchmarks/results, session 7 of 2026-11-29): the issuing, not only the TMA unit, limits it.
Here the rows go out as `cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32`, the plain (non-tensor)
bulk reduction, which takes linear addresses and so needs no tensor map: row r of the slab is issued by lane
r % (rows / 4) of warp r // (rows / 4), every row in the same instruction slot.

Completion is the warpgroup's bulk async groups, as for the TMA reduce-adds: afterwards every thread commits
(`plgpu.commit_smem_to_gmem_group`) and later awaits (`plgpu.wait_smem_to_gmem`) its own group. The slab must
be row-major without swizzle (each row `width * 4` bytes, a multiple of 16, contiguous in SMEM and in GMEM),
written before a proxy fence (`plgpu.commit_smem`). Additions are atomic per element; their order, hence the
rounding, varies run to run. Pallas GPU interpret mode cannot run inline Mosaic GPU code: the kernels that use
this are checked by cross-lowering on CPU and by the GPU benchmarks.
"""

from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref

WARPS = 4  # of the warpgroup, each issuing rows / WARPS rows from as many lanes
_REDUCE = "@$0 cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$2], [$1], {bytes};"


def _i32(v: int) -> ir.Value:
  return arith.constant(ir.IntegerType.get_signless(32), v)


def add_rows(staged, dst, indices, *, col: int) -> None:
  """Warpgroup code: dst[max(indices[r], 0), col:col+W] += staged[r] for every row r of staged.

  staged: SMEM ref [R, W] float32, row-major (R a multiple of 4 and at most 128; W * 4 bytes a multiple of 16);
  dst: GMEM ref [S, D] float32 with contiguous rows; indices: SMEM ref [R] int32; col: static column offset
  (col * 4 a multiple of 16, col + W <= D). An invalid (-1) index adds to row 0.
  """
  rows, width = staged.shape
  per_warp = rows // WARPS
  if rows % WARPS or not 0 < per_warp <= 32 or (width * 4) % 16 or (col * 4) % 16:
    raise ValueError(f"staged {staged.shape} at col={col}: rows must be a multiple of {WARPS} up to {32 * WARPS}, "
                     "width * 4 and col * 4 multiples of 16 bytes.")

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
  def _issue(_, staged_ref, dst_ref, idx_ref):
    i64, f32 = ir.IntegerType.get_signless(64), ir.F32Type.get()
    row_width = ir.MemRefType(dst_ref.type).shape[-1]
    tid = arith.remui(mgpu_utils.thread_idx(), _i32(32 * WARPS))
    lane = arith.remui(tid, _i32(32))
    active = arith.cmpi(arith.CmpIPredicate.ult, lane, _i32(per_warp))
    r = arith.addi(arith.muli(arith.divui(tid, _i32(32)), _i32(per_warp)), arith.minui(lane, _i32(per_warp - 1)))
    row = arith.maxsi(memref.load(idx_ref, [arith.index_cast(ir.IndexType.get(), r)]), _i32(0))
    src = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(staged_ref), [arith.muli(r, _i32(width))], f32)
    dst_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(dst_ref))
    element = arith.addi(arith.muli(arith.extui(i64, row), arith.constant(i64, row_width)),
                         arith.constant(i64, col))
    dst_row = mgpu_utils.getelementptr(dst_base, [element], f32)
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [active, src, dst_row], _REDUCE.format(bytes=width * 4),
                    "b,r,l", has_side_effects=True)

  _issue(staged, dst, indices)
