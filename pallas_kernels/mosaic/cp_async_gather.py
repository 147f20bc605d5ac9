"""Row gather by all 128 threads of a warpgroup with 16-byte `cp.async` copies (Mosaic GPU, inline).

Hopper has no TMA gather, and a TMA copy into a 128-byte-swizzled wgmma operand lands one row only as a
128-byte line: 9 copies per 576-wide row, 576 per 64-key block, issued by the few lanes that can issue them. Here
every thread of the warpgroup copies 16-byte pieces with `cp.async` (the LSU path, not the TMA unit): thread t
takes piece t % 8 of each 128-byte line of rows t // 8, t // 8 + 16, ... of the block, 36 copies per thread for
64 rows of 576 columns, and writes them to their swizzled place itself. A warp reads 4 whole lines of 128 bytes,
so global reads stay coalesced. Used by the sparse MLA kernels and the sparse indexer-KL kernels.

Layout written (that of `plgpu.TilingTransform((8, 64))` + `plgpu.SwizzleTransform(128)` on a [rows, W]
bf16 buffer, which wgmma reads): element (r, c) of a chunk of width W sits at tile (r // 8, c // 64), tiles
row-major of 8 x 64 elements (1 KiB, 1024-byte aligned), row r % 8 of the tile at 128 bytes, and its 16-byte
piece (c % 64) // 8 at position piece XOR (r % 8).

Completion: one `cp.async` commit group per block; the warpgroup later waits for all but the newest
groups (`wait`) and, after a proxy fence (the data were written through the generic proxy, wgmma reads
through the async one: `plgpu.commit_smem`), every thread arrives on the block's barrier (a Pallas barrier
of one arrival: in Lane semantics that is one per thread of the warpgroup).

Limits: bf16 rows, chunk widths multiples of 64, blocks of a multiple of 16 rows. Pallas GPU interpret mode cannot
run inline Mosaic GPU code, so the kernels gather by TMA there; this path is checked by cross-lowering on CPU and
by the GPU benchmarks, which compare the kernels' outputs with the references. It made the sparse MLA forward
about 2x faster than TMA row copies from four warps (docs/kernel_notes.md).
"""

import jax.numpy as jnp
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, nvvm

PIECE = 8  # 16-byte pieces per 128-byte swizzled line (bf16: 8 elements each)
PIECE_BYTES, LINE_BYTES = 16, 128
WARPGROUP = 128


def _i32(v: int) -> ir.Value:
  return arith.constant(ir.IntegerType.get_signless(32), v)


def _i64(v: int) -> ir.Value:
  return arith.constant(ir.IntegerType.get_signless(64), v)


def issue_block(kv_rows, indices, buffers, *, chunks, rows: int, scales=None) -> None:
  """Warpgroup code: cp.async copies of kv_rows[max(indices[r], 0), chunk] into buffers[i] for r < rows.

  kv_rows: GMEM ref [S, Dk] (bf16, or any type of 1 or 2 bytes: a line is 128 bytes, a piece 16), or a sequence of
  such refs, one per chunk (rows kept in separate arrays, such as the decode cache's latent and rope parts);
  indices: SMEM ref [rows] int32; buffers: one flat SMEM ref [rows * W] (of the chunk's source type, untransformed
  view of the tiled and swizzled chunk buffer, tiles of 8 lines) per (offset, W) of `chunks`, the offset a column
  of that chunk's source. `scales` = (GMEM ref [S, G] float32, SMEM ref [G, rows] float32): also copies
  scales[max(indices[r], 0), g] to [g, r], transposed (4-byte copies: the FP8 decode cache's per-tile scales,
  loaded as one row vector per tile). Commits one cp.async group.
  """
  sources = tuple(kv_rows) if isinstance(kv_rows, (tuple, list)) else (kv_rows,) * len(chunks)
  lines = tuple(LINE_BYTES // jnp.dtype(src.dtype).itemsize for src in sources)
  widths = tuple(w for _, w in chunks)
  if rows % (WARPGROUP // PIECE) or any(w % line for w, line in zip(widths, lines)):
    raise ValueError(f"rows={rows} must be a multiple of 16 and chunk widths {widths} multiples of 128 bytes.")

  refs = tuple(plgpu.RefType() for _ in chunks)
  scale_refs = () if scales is None else (plgpu.RefType(), plgpu.RefType())

  @plgpu.inline_mgpu(arg_types=(refs, plgpu.RefType(), refs, scale_refs))
  def _issue(_, kv_refs, idx_ref, bufs, scale_args):
    i64 = ir.IntegerType.get_signless(64)
    tid = arith.remui(mgpu_utils.thread_idx(), _i32(WARPGROUP))
    piece = arith.remui(tid, _i32(PIECE))
    row_in_pass = arith.divui(tid, _i32(PIECE))
    global_ptr = llvm.PointerType.get(address_space=1)
    kv_bases = [(llvm.addrspacecast(global_ptr, mgpu_utils.memref_ptr(k)), ir.MemRefType(k.type).shape[-1],
                 ir.MemRefType(k.type).element_type) for k in kv_refs]
    buf_bases = [mgpu_utils.memref_ptr(b) for b in bufs]
    elems = [PIECE_BYTES // mgpu_utils.bytewidth(dtype) for *_, dtype in kv_bases]  # per piece, each chunk
    for p in range(rows // (WARPGROUP // PIECE)):
      r = arith.addi(row_in_pass, _i32(p * (WARPGROUP // PIECE)))
      row = memref.load(idx_ref, [arith.index_cast(ir.IndexType.get(), r)])
      row = arith.maxsi(row, _i32(0))
      row64 = arith.extui(i64, row)
      r8, sub = arith.divui(r, _i32(8)), arith.remui(r, _i32(8))
      in_tile = {}  # per piece size: offset of this thread's piece in its tile
      for e in dict.fromkeys(elems):
        swizzled = arith.muli(arith.xori(piece, sub), _i32(e))
        in_tile[e] = arith.addi(arith.muli(sub, _i32(PIECE * e)), swizzled)
      for (off, width), base, (kv_base, dk, dtype), e in zip(chunks, buf_bases, kv_bases, elems):
        line = PIECE * e
        src_row = arith.muli(row64, _i64(dk))
        for ct in range(width // line):
          col = arith.addi(_i64(off + line * ct), arith.extui(i64, arith.muli(piece, _i32(e))))
          src = mgpu_utils.getelementptr(kv_base, [arith.addi(src_row, col)], dtype)
          tile = arith.addi(arith.muli(r8, _i32(width // line)), _i32(ct))
          dst_off = arith.addi(arith.muli(tile, _i32(8 * line)), in_tile[e])
          dst = mgpu_utils.getelementptr(base, [dst_off], dtype)
          nvvm.cp_async_shared_global(dst, src, PIECE_BYTES, nvvm.LoadCacheModifierKind.CG)
    if scales is not None:
      _issue_scales(*scale_args, idx_ref, rows)
    nvvm.cp_async_commit_group()

  _issue(sources, indices, tuple(buffers), () if scales is None else tuple(scales))


def _issue_scales(scale_ref, buf, idx_ref, rows: int) -> None:
  """Inline code: 4-byte cp.async of scale_ref[max(idx[r], 0), g] to buf[g, r]; thread t takes the elements
  e = t, t + 128, ... of the rows * G (element e: row e // G, tile e % G, so a warp reads whole scale rows)."""
  i64, f32 = ir.IntegerType.get_signless(64), ir.F32Type.get()
  groups = ir.MemRefType(scale_ref.type).shape[-1]
  src_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(scale_ref))
  dst_base = mgpu_utils.memref_ptr(buf)
  tid = arith.remui(mgpu_utils.thread_idx(), _i32(WARPGROUP))
  for p in range(-(-rows * groups // WARPGROUP)):
    e = arith.addi(tid, _i32(p * WARPGROUP))
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, e, _i32(rows * groups))):
      r, g = arith.divui(e, _i32(groups)), arith.remui(e, _i32(groups))
      row = arith.maxsi(memref.load(idx_ref, [arith.index_cast(ir.IndexType.get(), r)]), _i32(0))
      src = mgpu_utils.getelementptr(src_base, [arith.addi(arith.muli(arith.extui(i64, row), _i64(groups)),
                                                           arith.extui(i64, g))], f32)
      dst = mgpu_utils.getelementptr(dst_base, [arith.addi(arith.muli(g, _i32(rows)), r)], f32)
      nvvm.cp_async_shared_global(dst, src, 4, nvvm.LoadCacheModifierKind.CA)


def wait(pending: int) -> None:
  """Warpgroup code: wait until at most `pending` of this thread's newest cp.async groups are in flight."""

  @plgpu.inline_mgpu()
  def _wait(_):
    nvvm.cp_async_wait_group(pending)

  _wait()

