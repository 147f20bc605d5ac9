"""Per-row copies of a gathered key block, issued from one lane or spread over the warps of a warpgroup.

Hopper has no TMA gather: the sparse kernels move each selected row with its own TMA, into SMEM (the gathers of
the sparse indexer-KL kernels, and of the sparse MLA kernels in interpret mode) or out of it (the dkv / d idx_k
reduce-adds of the backward kernels). One thread issuing hundreds of copies per 64-key block bounds such a kernel;
spreading them over the four warps of the warpgroup divides that issue time.
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def issue_row_copies(bk: int, warps: int, index_of, copy_row) -> None:
  """copy_row(r, max(index_of(r), 0)) for the rows r < bk of a key block, inside one warpgroup.

  warps = 1: one loop, every copy issued by the warpgroup's one elected thread. G > 1: warp w of the
  warpgroup copies rows w, w + G, ... from its own lane (`plgpu.warp_map`). Warp code cannot read SMEM
  scalars (memref.load has no warp semantics), so the warpgroup reads each group's G indices first and
  each warp picks its own. Copies that complete on an mbarrier may be issued from any lane. So may SMEM ->
  GMEM copies tracked by bulk async groups (the reduce-adds of `sparse_mla.kernel_bwd` and
  `indexer_kl.kernel_sparse_bwd`): a group belongs to its issuing thread, but `plgpu.commit_smem_to_gmem_group`
  and `plgpu.wait_smem_to_gmem` in warpgroup code run on all 128 threads, each committing and awaiting its own
  copies, before a warpgroup barrier.
  """
  if warps == 1:
    @pl.loop(0, bk)
    def _row(r):
      copy_row(r, jnp.maximum(index_of(r), 0))
    return

  @pl.loop(0, bk // warps)
  def _group(i):
    rows = [jnp.maximum(index_of(i * warps + w), 0) for w in range(warps)]

    @plgpu.warp_map
    def _per_warp(warp):
      @pl.when(warp < warps)
      def _():
        row = rows[0]
        for w in range(1, warps):
          row = jnp.where(warp == w, rows[w], row)
        copy_row(i * warps + warp, row)
