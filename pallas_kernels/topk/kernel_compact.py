"""Mosaic GPU kernel: the exact top-k positions of short uint32 rows (M <= 16384), threshold and compaction.

`topk_positions(keys, k)` = `radix.topk_positions(keys, k)`: per row the ascending positions of the k largest
keys (ties to the lower position), -1 padded, the -inf key (`radix.NEG_INF_KEY`) never selected. The pruned
select (`pruned.py`) runs it for both of its selections. Compacting in XLA instead (a cumsum over the row and a
scatter after the threshold kernel) cost about as much device time as everything else in the select; here the
row, already in SMEM for the threshold, is compacted in place.

One CTA = one warpgroup = one row, as `kernel_select`: TMA the row into SMEM as [M / 128, 128], bisect it in
registers (`kernel_select.bisect`) to the threshold x, then (inline Mosaic GPU code, every thread; block row i
holds positions 128 i .. 128 i + 127, thread t reads column t):
1. Per block row, each warp's count of keys above x and of ties (== x): `vote.sync.ballot` + popc, lane 0
   stores them into SMEM counts [2, 4 warps, M / 128]. Barrier.
2. Thread t owns block row t: its row totals, an inclusive scan over the 128 threads (5 `shfl.up` rounds, the
   warp totals through SMEM, barrier), then the exclusive base of every (warp, block row) pair, written over
   the counts. Barrier.
3. Per block row again: a key's rank among the selected keys is base(warp, row) + popc(ballot & lanemask_lt);
   above keys take rank = (above before) + min(ties before, need), ties only while (ties before) < need =
   k - #above; selected keys store their position to out[r, rank] (GMEM), and the slots from the selected
   count to k get -1.
Padding to a multiple of 128 (key 0) is excluded by position. Scores must not be NaN.

GPU interpret mode cannot run the inline code: there the threshold kernel (`kernel_select`) runs and XLA
compacts (`radix.select`), so CPU tests check the threshold and the API; the compaction is checked by
cross-lowering here and for exactness on the GPU (`bench.py`, including rows full of ties). Today's figure
(the whole pruned select at 1024 x 128K, k = 2048): about 12x `lax.top_k`, benchmarks/topk.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, math as mlir_math, memref, nvvm, scf

from pallas_kernels.dispatch import interpreting
from pallas_kernels.topk import kernel_select, radix

LANES = kernel_select.LANES
WARPS = LANES // 32
NEG_INF_KEY = radix.NEG_INF_KEY


def topk_positions(keys: jax.Array, k: int, *, bits_per_step: int = 1, interpret=False) -> jax.Array:
  """keys uint32 [R, M] (M <= 16384, k <= M) -> int32 [R, k]: ascending positions of each row's top k, -1 padded.

  bits_per_step: the bisection's bits per step (`kernel_select`; same result for both).
  """
  kernel_select.check_bits_per_step(bits_per_step)
  rows, m = keys.shape
  if m > kernel_select.MAX_KEYS or not 0 < k <= m:
    raise ValueError(f"rows of {m} keys with k={k}: allowed M <= {kernel_select.MAX_KEYS} and 0 < k <= M.")
  keys = keys.astype(jnp.uint32)
  if interpreting(interpret):  # no inline compaction there: the threshold kernel, then XLA's compaction
    threshold = kernel_select.kth_largest_keys(keys, k, bits_per_step=bits_per_step, interpret=interpret)
    return radix.select(keys, threshold, k)
  padded = jnp.pad(keys, ((0, 0), (0, -m % LANES)))  # key 0: never counted, excluded by position
  blocks = padded.shape[1] // LANES
  return plgpu.kernel(
      functools.partial(_kernel, k=k, m=m, bits_per_step=bits_per_step),
      out_type=jax.ShapeDtypeStruct((rows, k), jnp.int32),
      scratch_types=dict(keys_smem=plgpu.SMEM((blocks, LANES), jnp.uint32), barrier=plgpu.Barrier(),
                         threshold_smem=plgpu.SMEM((1,), jnp.uint32),
                         counts_smem=plgpu.SMEM((2, WARPS, LANES), jnp.int32),
                         totals_smem=plgpu.SMEM((2, WARPS), jnp.int32)),
      grid=(rows,),
      grid_names=("r",),
      compiler_params=kernel_select.compiler_params(bits_per_step),
      kernel_name="_topk_positions",
      interpret=interpret,
  )(padded.reshape(rows, blocks, LANES))


def _kernel(keys_ref, out_ref, *, keys_smem, barrier, threshold_smem, counts_smem, totals_smem, k, m,
            bits_per_step):
  r = lax.axis_index("r")
  plgpu.copy_gmem_to_smem(keys_ref.at[r], keys_smem, barrier)
  plgpu.barrier_wait(barrier)
  values = kernel_select.load_row(keys_smem, bits_per_step=bits_per_step)
  threshold_smem[0] = kernel_select.bisect(values, jnp.int32(k), bits_per_step=bits_per_step)
  _compact(keys_smem, threshold_smem, counts_smem, totals_smem, out_ref.at[r], k=k, m=m)


def _c(v: int) -> ir.Value:
  """An int32 constant (`mgpu_utils.c` with the type this code always uses)."""
  return mgpu_utils.c(v, ir.IntegerType.get_signless(32))


def _compact(keys_smem, threshold_smem, counts_smem, totals_smem, out_row, *, k: int, m: int) -> None:
  """Warpgroup code: steps 1-3 of the module docstring for one row (out_row: GMEM int32 [k])."""
  ref = plgpu.RefType()

  @plgpu.inline_mgpu(arg_types=(ref, ref, ref, ref, ref))
  def _body(_, keys, threshold_ref, counts, totals, out):
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    idx = lambda v: arith.index_cast(index, v)
    blocks = ir.MemRefType(keys.type).shape[0]
    full = _c(-1)
    tid = arith.remui(mgpu_utils.thread_idx(), _c(LANES))
    lane, warp = arith.remui(tid, _c(32)), arith.divui(tid, _c(32))
    lane_lt = nvvm.read_ptx_sreg_lanemask_lt(results=[i32])
    popc = lambda x: mlir_math.ctpop(x)
    ult = lambda a, b: arith.cmpi(arith.CmpIPredicate.ult, a, b)
    eq = lambda a, b: arith.cmpi(arith.CmpIPredicate.eq, a, b)
    mgpu_utils.warpgroup_barrier()  # the threshold, stored by the Pallas code above
    x = memref.load(threshold_ref, [idx(_c(0))])
    x_is_finite = ult(_c(NEG_INF_KEY), x)  # ties of x can be selected (x above the -inf key)

    def flags(i):
      """(above, tie) ballots of block row i (i: index value)."""
      key = memref.load(keys, [i, idx(tid)])
      position = arith.addi(arith.muli(arith.index_cast(i32, i), _c(LANES)), tid)
      valid = ult(position, _c(m))
      real = arith.andi(valid, arith.cmpi(arith.CmpIPredicate.ne, key, _c(NEG_INF_KEY)))
      above = arith.andi(real, ult(x, key))
      tie = arith.andi(valid, eq(key, x))
      ballot = lambda p: nvvm.vote_sync(full, p, "ballot", results=[i32])
      return ballot(above), ballot(tie), position

    # 1. Per (warp, block row) counts.
    loop = scf.ForOp(idx(_c(0)), idx(_c(blocks)), idx(_c(1)))
    with ir.InsertionPoint(loop.body):
      i = loop.induction_variable
      b_above, b_tie, _ = flags(i)
      if_lane0 = scf.IfOp(eq(lane, _c(0)))
      with ir.InsertionPoint(if_lane0.then_block):
        memref.store(popc(b_above), counts, [idx(_c(0)), idx(warp), i])
        memref.store(popc(b_tie), counts, [idx(_c(1)), idx(warp), i])
        scf.yield_([])
      scf.yield_([])
    mgpu_utils.warpgroup_barrier()

    # 2. Thread t owns block row t: row totals, scan over threads, bases per (warp, block row).
    owns_row = ult(tid, _c(blocks))
    row = idx(arith.select(owns_row, tid, _c(0)))
    per_warp = [[arith.select(owns_row, memref.load(counts, [idx(_c(p)), idx(_c(w)), row]), _c(0))
                 for w in range(WARPS)] for p in range(2)]
    scanned = []
    for p in range(2):
      total = per_warp[p][0]
      for w in range(1, WARPS):
        total = arith.addi(total, per_warp[p][w])
      inclusive = total
      for shift in (1, 2, 4, 8, 16):
        up = nvvm.shfl_sync(full, inclusive, _c(shift), _c(0), nvvm.ShflKind.up)
        inclusive = arith.select(ult(lane, _c(shift)), inclusive, arith.addi(inclusive, up))
      if_last = scf.IfOp(eq(lane, _c(31)))
      with ir.InsertionPoint(if_last.then_block):
        memref.store(inclusive, totals, [idx(_c(p)), idx(warp)])
        scf.yield_([])
      scanned.append((total, inclusive))
    mgpu_utils.warpgroup_barrier()
    sums = []  # per part: (exclusive prefix of this thread's block row, total over the row)
    for p, (total, inclusive) in enumerate(scanned):
      before, everything = _c(0), _c(0)
      for w in range(WARPS):
        t = memref.load(totals, [idx(_c(p)), idx(_c(w))])
        before = arith.addi(before, arith.select(ult(_c(w), warp), t, _c(0)))
        everything = arith.addi(everything, t)
      sums.append((arith.addi(before, arith.subi(inclusive, total)), everything))
    if_row = scf.IfOp(owns_row)
    with ir.InsertionPoint(if_row.then_block):
      for p, (base, _) in enumerate(sums):
        for w in range(WARPS):
          memref.store(base, counts, [idx(_c(p)), idx(_c(w)), row])
          base = arith.addi(base, per_warp[p][w])
      scf.yield_([])
    mgpu_utils.warpgroup_barrier()
    above_total, tie_total = sums[0][1], sums[1][1]
    need = arith.select(x_is_finite, arith.subi(_c(k), above_total), _c(0))
    minimum = lambda a, b: arith.select(arith.cmpi(arith.CmpIPredicate.slt, a, b), a, b)
    selected_total = arith.addi(above_total, minimum(tie_total, need))
    out_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(out))

    def store(slot, value):
      llvm.store(value, mgpu_utils.getelementptr(out_base, [arith.extui(ir.IntegerType.get_signless(64), slot)], i32))

    # 3. Ranks and stores.
    loop = scf.ForOp(idx(_c(0)), idx(_c(blocks)), idx(_c(1)))
    with ir.InsertionPoint(loop.body):
      i = loop.induction_variable
      b_above, b_tie, position = flags(i)
      above_before = arith.addi(memref.load(counts, [idx(_c(0)), idx(warp), i]), popc(arith.andi(b_above, lane_lt)))
      ties_before = arith.addi(memref.load(counts, [idx(_c(1)), idx(warp), i]), popc(arith.andi(b_tie, lane_lt)))
      mine = lambda b: arith.cmpi(arith.CmpIPredicate.ne, arith.andi(b, arith.shli(_c(1), lane)), _c(0))
      is_tie = arith.andi(mine(b_tie), arith.cmpi(arith.CmpIPredicate.slt, ties_before, need))
      selected = arith.ori(arith.andi(mine(b_above), ult(above_before, _c(k))), is_tie)
      rank = arith.addi(above_before, minimum(ties_before, need))
      if_selected = scf.IfOp(selected)
      with ir.InsertionPoint(if_selected.then_block):
        store(rank, position)
        scf.yield_([])
      scf.yield_([])
    loop = scf.ForOp(idx(tid), idx(_c(k)), idx(_c(LANES)))  # -1 in the slots past the selected keys
    with ir.InsertionPoint(loop.body):
      slot = arith.index_cast(i32, loop.induction_variable)
      if_pad = scf.IfOp(arith.cmpi(arith.CmpIPredicate.sge, slot, selected_total))
      with ir.InsertionPoint(if_pad.then_block):
        store(slot, _c(-1))
        scf.yield_([])
      scf.yield_([])

  _body(keys_smem, threshold_smem, counts_smem, totals_smem, out_row)
