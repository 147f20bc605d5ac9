"""Mosaic GPU kernel for the exact k-th largest uint32 key of short rows (M <= 16384): one HBM read per row.

`kth_largest_keys(keys, k)` = per row, the largest x with #(keys >= x) >= k: the threshold of
`kernel.kth_largest(keys, k, 32, 1)` (valid=None). There each of the 32 bisection passes is an XLA
reduction that re-reads the whole [R, M] block from HBM; here every row is read once.

Design (one CTA = one warpgroup = one row; grid = (R,), so rows map to CUDA x, which has no 65535 cap):
1. TMA the row, viewed as [M / 128, 128] (a box of <= 128 x 128 elements, within the 256-per-dimension TMA
   limit), into SMEM (64 KiB at M = 16384), and load it ONCE into registers in the warpgroup-strided layout
   (layout inference picks `WGStridedFragLayout` with 2-element vectors: 128 values per thread at M = 16384).
2. 32 bisection steps on the registers (a `fori_loop`; the row is a loop invariant): candidate =
   prefix | 2^(31 - i); count = sum(keys >= candidate) over the whole warpgroup; keep the candidate when
   count >= k. The full-array `.sum()` lowers (default Warpgroup semantics of jax 0.11.2) to
   `vector.reduction <add>` on the strided layout, i.e. `FragmentedArray.reduce`: per-thread adds, a warp
   reduction, then a cross-warp exchange through the `reduction_scratch_bytes` SMEM scratch (default 2048 B).
   Compares are unsigned (`arith.cmpi uge`) on uint32 directly: no signed remap needed.
   Lowered at 1024 x 16384 for an H200: grid 1024 x 1 x 1, 128 threads, 67592 B dynamic SMEM.
3. The 32-bit result is stored as a scalar straight to GMEM (`out[r] = prefix`).
Rows whose length is not a multiple of 128 are padded with key 0: every candidate is >= 1, so padding is
never counted and the result is unchanged (0 also is the answer when no candidate reaches k, as in XLA).

Cost model (H200, 1024 rows x 16384): HBM 64 MiB (~20 us); ALU 32 x 16384 x ~2 int ops per row, ~1 G ops in
all (~40-60 us at 132 SMs x 128 lanes); occupancy <= 3 CTAs per SM (64 KiB SMEM, ~128+ registers per thread).
Target: well under 1 ms, vs 3.2 ms for the XLA pruned select. Measured on the H200 (2026-11-29): the whole
pruned select built on it (two selections of this kernel plus XLA compaction) takes 1.34 ms at 1024 x 128K,
exact, vs 3.5 ms with sorts and 9.5 ms for lax.top_k.

What only the GPU can check (interpret mode and cross-lowering cannot): that ptxas keeps the 128 values per
thread in registers without spilling (if it spills, re-read the row from SMEM each step instead, or use
two warpgroups per row), the measured time at 1024 x 16384, and that the per-step cross-warp reduction
(SMEM scratch + barrier) is not the bottleneck (if it is, count 2-4 candidates per step, i.e. 2-4 bits per
pass, which costs more compares but fewer reductions). The per-thread integer adds form one dependent chain
(`FragmentedArray.reduce` uses acc_ilp = 1 for integers); 3 CTAs per SM should hide that latency. The
result store to GMEM is issued by all 128 threads with the same value (a benign, identical write).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

LANES = 128  # values per SMEM row of the [M / 128, 128] view = threads in a warpgroup
MAX_KEYS = 16384  # 128 uint32 registers per thread; 64 KiB of SMEM


def kth_largest_keys(keys: jax.Array, k: jax.Array | int, *, interpret=False) -> jax.Array:
  """keys uint32 [R, M] (M <= 16384), k int32 [R] or int -> uint32 [R]: largest x with #(keys >= x) >= k."""
  rows, m = keys.shape
  if m > MAX_KEYS:
    raise ValueError(f"rows of {m} keys are too long: at most {MAX_KEYS}.")
  keys = keys.astype(jnp.uint32)
  pad = -m % LANES
  if pad:
    keys = jnp.pad(keys, ((0, 0), (0, pad)))  # key 0: below every candidate, never counted
  blocks = keys.shape[1] // LANES
  want = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (rows,))
  return plgpu.kernel(
      _kernel,
      out_type=jax.ShapeDtypeStruct((rows,), jnp.uint32),
      scratch_types=dict(keys_smem=plgpu.SMEM((blocks, LANES), jnp.uint32), barrier=plgpu.Barrier()),
      grid=(rows,),
      grid_names=("r",),
      interpret=interpret,
  )(keys.reshape(rows, blocks, LANES), want)


def _kernel(keys_ref, k_ref, out_ref, *, keys_smem, barrier):
  r = lax.axis_index("r")
  plgpu.copy_gmem_to_smem(keys_ref.at[r], keys_smem, barrier)
  want = k_ref[r]
  plgpu.barrier_wait(barrier)
  out_ref[r] = bisect(keys_smem[...], want)  # [M / 128, 128] in registers, strided layout: read once


def bisect(values: jax.Array, want: jax.Array) -> jax.Array:
  """Inside a kernel: the 32 bisection steps on uint32 `values` held in registers (the row is a loop
  invariant) -> uint32 scalar, the largest x with #(values >= x) >= want (0 if none). Also used by
  `kernel_group_select`."""

  def step(i, prefix):
    candidate = prefix | (jnp.uint32(0x80000000) >> i.astype(jnp.uint32))
    count = (values >= candidate).astype(jnp.int32).sum()
    return jnp.where(count >= want, candidate, prefix)

  return lax.fori_loop(0, 32, step, jnp.uint32(0))
