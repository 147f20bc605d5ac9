"""Mosaic GPU kernel: the exact k-th largest uint32 key of short rows (M <= 16384), one HBM read per row.

`kth_largest_keys(keys, k)` = per row, the largest x with #(keys >= x) >= k, the threshold of
`radix.kth_largest`, whose 32 bisection passes are XLA reductions that each re-read the whole [R, M] block.
Here one CTA (one warpgroup, grid = (R,): rows on CUDA x, which has no 65535 cap) owns one row:
1. TMA the row, viewed as [M / 128, 128] (a box within the 256-per-dimension TMA limit), into SMEM and load it
   once into registers (128 values per thread at M = 16384);
2. bisect on the registers, the row a loop invariant: candidate = prefix | 2^(31 - i), count = #(row >=
   candidate) over the warpgroup (per-thread adds, a warp reduction, one cross-warp exchange through SMEM),
   keep the candidate while count >= k. Unsigned compares need no remap of the keys.
Rows whose length is not a multiple of 128 are padded with key 0, which no candidate (>= 1) counts; 0 is also
the answer when no candidate reaches k, as in XLA.

`bisect` and `load_row` are also the first half of `kernel_compact`, the kernel the pruned select runs; this
kernel alone is what GPU interpret mode runs in its place (interpret mode cannot run the compaction).

`bits_per_step=2` decides 2 bits per step (16 steps instead of 32): the 3 candidates prefix | (d << shift) are
counted in one pass (3 add chains) and reduced together in one cross-warp exchange, in Lane semantics with the
row in the `COLUMNS` layout (thread t holds column t); the threshold is bitwise the same. It was faster than
1 bit per step for this kernel alone on the H200 but has not been measured inside `kernel_compact`
(docs/kernel_notes.md); the default stays 1 until it is.
Limits: M <= MAX_KEYS (128 registers per thread for the row); each step is latency-bound (a dependent add
chain and a warpgroup-wide reduction), not ALU-bound.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

LANES = 128  # values per SMEM row of the [M / 128, 128] view = threads in a warpgroup
MAX_KEYS = 16384  # 128 uint32 registers per thread; 64 KiB of SMEM
BITS_PER_STEP = (1, 2)  # bits decided per bisection step
_COUNT_SCRATCH_BYTES = 4 * 32 * 4  # reduction scratch of one stacked count: 4 warps x 32 lanes x 4 bytes
# Thread t (warp t // 32, lane t % 32) holds column t of every row of [M / 128, 128]: M / 128 registers.
COLUMNS = plgpu.Layout.TILED(plgpu.Tiling(((1, LANES), (32,), (1,))), warp_dims=(-3,), lane_dims=(-2,),
                             vector_dim=-1)


def check_bits_per_step(bits_per_step: int):
  if bits_per_step not in BITS_PER_STEP:
    raise ValueError(f"bits_per_step={bits_per_step} is invalid; allowed: {BITS_PER_STEP}.")


def compiler_params(bits_per_step: int, **params) -> plgpu.CompilerParams:
  """1 bit per step: the default Warpgroup semantics (strided layout, `.sum()`); 2: Lane semantics with scratch
  for the 3 counts of a step, so that one exchange reduces them all."""
  if bits_per_step == 1:
    return plgpu.CompilerParams(**params)
  scratch = max(2048, ((1 << bits_per_step) - 1) * _COUNT_SCRATCH_BYTES)
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, reduction_scratch_bytes=scratch,
                              **params)


def kth_largest_keys(keys: jax.Array, k: jax.Array | int, *, bits_per_step: int = 1, interpret=False) -> jax.Array:
  """keys uint32 [R, M] (M <= 16384), k int32 [R] or int -> uint32 [R]: largest x with #(keys >= x) >= k."""
  check_bits_per_step(bits_per_step)
  rows, m = keys.shape
  if m > MAX_KEYS:
    raise ValueError(f"rows of {m} keys are too long: at most {MAX_KEYS}.")
  keys = jnp.pad(keys.astype(jnp.uint32), ((0, 0), (0, -m % LANES)))  # key 0: never counted
  blocks = keys.shape[1] // LANES
  want = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (rows,))
  return plgpu.kernel(
      functools.partial(_kernel, bits_per_step=bits_per_step),
      out_type=jax.ShapeDtypeStruct((rows,), jnp.uint32),
      scratch_types=dict(keys_smem=plgpu.SMEM((blocks, LANES), jnp.uint32), barrier=plgpu.Barrier()),
      grid=(rows,),
      grid_names=("r",),
      compiler_params=compiler_params(bits_per_step),
      kernel_name="_kth_largest_keys",  # not "anonymous" (the name of a partial) in lowered modules and profiles
      interpret=interpret,
  )(keys.reshape(rows, blocks, LANES), want)


def _kernel(keys_ref, k_ref, out_ref, *, keys_smem, barrier, bits_per_step):
  r = lax.axis_index("r")
  plgpu.copy_gmem_to_smem(keys_ref.at[r], keys_smem, barrier)
  want = k_ref[r]
  plgpu.barrier_wait(barrier)
  values = load_row(keys_smem, bits_per_step=bits_per_step)
  out_ref[r] = bisect(values, want, bits_per_step=bits_per_step)


def load_row(ref, *, bits_per_step: int = 1) -> jax.Array:
  """Inside a kernel: SMEM [M / 128, 128] -> registers in the layout `bisect` counts in (strided by layout
  inference for 1 bit per step, `COLUMNS` for 2)."""
  if bits_per_step > 1:
    return plgpu.load(ref, layout=COLUMNS)
  return ref[...]


def bisect(values: jax.Array, want: jax.Array, *, bits_per_step: int = 1) -> jax.Array:
  """Inside a kernel: the 32 / b bisection steps on uint32 `values` [M / 128, 128] in registers (from `load_row`
  with the same b) -> uint32 scalar, the largest x with #(values >= x) >= want (0 if none)."""
  check_bits_per_step(bits_per_step)
  if bits_per_step == 1:

    def step(i, prefix):
      candidate = prefix | (jnp.uint32(0x80000000) >> i.astype(jnp.uint32))
      count = (values >= candidate).astype(jnp.int32).sum()
      return jnp.where(count >= want, candidate, prefix)

    return lax.fori_loop(0, 32, step, jnp.uint32(0))

  digits = (1 << bits_per_step) - 1

  def count(candidate):
    """-> int32 [1, 128]: thread t's count of values >= candidate in its column (register adds only)."""
    at_or_above = (values >= candidate).astype(jnp.int32).sum(axis=0)
    return plgpu.layout_cast(lax.broadcast_in_dim(at_or_above, (1, LANES), (1,)), COLUMNS)

  def step(i, prefix):
    shift = (32 - bits_per_step * (i + 1)).astype(jnp.uint32)
    per_thread = [count(prefix | (jnp.uint32(d) << shift)) for d in range(1, digits + 1)]
    # [D, 128] -> [D]: one reduction, so one cross-warp exchange for all D counts.
    counts = jnp.concatenate(per_thread, axis=0).sum(axis=1)
    digit = (counts >= want).astype(jnp.uint32).sum()  # counts non-increasing in d: the largest d reaching want
    return prefix | (digit << shift)

  return lax.fori_loop(0, 32 // bits_per_step, step, jnp.uint32(0))
