"""Reading another CTA's SMEM inside a cluster (distributed shared memory), for accumulators (Mosaic GPU, inline).

`add_peer(slot, acc)` returns acc + the float32 [M, N] array that the other CTA of a 2-CTA cluster (rank
%cluster_ctarank ^ 1) holds at the same SMEM place as `slot` (a row-major float32 [M, N] ref of this CTA; CTAs of one kernel have the same SMEM
layout). Every thread loads exactly its own accumulator fragments (wgmma layout: 2 adjacent floats of two rows
per 8 columns) with `mapa.shared::cluster` + `ld.shared::cluster.v2.f32`, so the result keeps acc's layout and
nothing is staged again. Pallas' `plgpu.cluster_ref` + `plgpu.load` did not lower for such a slot (a view inside
a `RefUnion`: the cluster-mapped memref lost its offset, jax 0.11.2).

The caller orders the accesses: the other CTA must have written the slot and made it visible (a cluster-scope
fence, then a cluster barrier) before this runs, and must not overwrite it before this CTA says it has read it.
Interpret mode cannot run inline Mosaic GPU code: the kernel that uses this is checked by cross-lowering on CPU
and on the GPU.
"""

import numpy as np
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, nvvm, vector

_LOAD_V2 = """{
  .reg .b32 remote;
  mapa.shared::cluster.u32 remote, $2, $3;
  ld.shared::cluster.v2.f32 {$0, $1}, [remote];
}"""


def add_peer(slot, acc):
  """Warpgroup code: acc (float32 [M, N], wgmma layout) + the other CTA's copy of `slot` (SMEM float32 [M, N])."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WGMMA),
                     return_type=plgpu.ShapeDtypeStruct(acc.shape, acc.dtype, plgpu.Layout.WGMMA))
  def _add(_, slot_ref, acc_fa):
    if acc_fa.layout != mgpu_fa.WGMMA_LAYOUT:
      raise ValueError(f"acc must have the wgmma layout (vectors of 2), got {acc_fa.layout}.")
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    width = ir.MemRefType(slot_ref.type).shape[-1]
    base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(slot_ref))  # a shared-window address
    peer = arith.xori(nvvm.read_ptx_sreg_cluster_ctarank(results=[i32]), arith.constant(i32, 1))
    pair_ty = ir.Type.parse("!llvm.struct<(f32, f32)>")
    out = np.empty_like(acc_fa.registers)
    for (r, c), reg in zip(acc_fa.layout.thread_idxs(acc_fa.shape), np.ndindex(acc_fa.registers.shape),
                           strict=True):
      element = arith.addi(arith.muli(arith.index_castui(i32, r), arith.constant(i32, width)),
                           arith.index_castui(i32, c))
      address = arith.addi(base, arith.muli(element, arith.constant(i32, 4)))
      pair = llvm.inline_asm(pair_ty, [address, peer], _LOAD_V2, "=f,=f,r,r", has_side_effects=True)
      values = [llvm.extractvalue(f32, pair, [i]) for i in range(2)]
      loaded = vector.from_elements(ir.VectorType.get((2,), f32), values)
      out[reg] = arith.addf(acc_fa.registers[reg], loaded)
    return mgpu_fa.FragmentedArray(_registers=out, _layout=acc_fa.layout, _is_signed=None)

  return _add(slot, acc)
