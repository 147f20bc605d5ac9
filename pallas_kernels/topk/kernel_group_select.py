"""Mosaic GPU kernel: the group maxima of long rows and the k-th largest of them, in one HBM read per row.

`group_maxima_and_threshold(rows, g, k)` fuses steps 1-2 of `pruned.py`'s "pruned_select" up to the first
threshold: per row of S float32 scores, the maxima of its ceil(S / g) groups of g consecutive keys, bitwise
`pruned.group_maxima(rows, g)[1]` (int32 in the float total order, -0.0 < +0.0, the last group -inf padded),
and the largest x with #(maxima keys >= x) >= k, exactly `kernel_select.kth_largest_keys` on the uint32 keys
of those maxima (ordered ^ 0x80000000). Without it, an XLA pass reads the rows and writes the maxima, then the
threshold kernel reads the maxima back.

Design (one CTA = one warpgroup of 128 threads = one row; grid = (R,)):
1. XLA views the float32 rows as int32 bits (a free bitcast) shaped [R, chunks, A, 128, g]: a chunk of
   `chunk_keys` keys = A slabs of 128 groups. The CTA streams its row chunk by chunk through a ring of
   `buffers` SMEM slots [A, 128, g] (one mbarrier each): each chunk is one contiguous `cp.async.bulk` (the
   chunks never leave the padded row, so PROMISE_IN_BOUNDS), refilled as soon as the chunk is in registers.
2. A chunk goes into registers in an explicit `TiledLayout`: thread t holds group t of every slab, its g keys
   as g / 4 vectors of 4 (16-byte SMEM loads), so the group maximum is thread-local (no shuffles). Each key
   becomes its ordered int32, bits ^ ((bits >> 31) & 0x7FFFFFFF) (= sortable_keys ^ 0x80000000, as
   `pruned.group_maxima`), and a signed max over g gives [A, 128] maxima, stored to the maxima SMEM
   [M / 128, 128] (M = groups per padded row; group j at row j // 128, lane j % 128): 128 consecutive groups
   per SMEM row, the view `kernel_select` uses.
3. After the last chunk the maxima go to GMEM in one bulk store (issued first, it overlaps the bisection),
   come back from SMEM into registers in the strided layout (128 per thread at M = 16384), are XORed to
   uint32 keys, and `kernel_select.bisect` runs the same 32 bisection steps on them; the threshold is stored
   as a scalar. `bits_per_step` / `partial_sums` pick `kernel_select`'s counting options (same threshold):
   b > 1 or P given load the maxima in `kernel_select.COLUMNS` instead (`kernel_select.load_row`; this kernel
   is in Lane semantics already) and count 2^b - 1 candidates per step, all reduced in one cross-warp
   exchange; the reduction scratch then grows to max(2048, 512 (2^b - 1)) B: lowered at b = 4, 106512 B
   (2 CTAs per SM still fit), 204816 B with chunk_keys=16384; b = 2: 100368 B as the default.
SMEM at the defaults (chunks of 4096 keys, 2 buffers): 2 x 16 KiB + 64 KiB maxima + the 2 KiB reduction
scratch; lowered at 1024 x 131072, g = 8: grid 1024 x 1 x 1, 128 threads, 100368 B dynamic SMEM, so 2 CTAs
fit on an SM (228 KiB): one CTA's bisection (ALU and latency bound) can overlap the other's streaming (HBM
bound). chunk_keys=16384 (64 KiB chunks, the 128 x 128 box of `kernel_select`) takes 198672 B: 1 CTA per
SM, fewer barriers per row, but the SM's HBM stream stops while its row is bisected.
Lane lowering semantics: with the default Warpgroup semantics, layout inference gives the chunk slots an
(8, 8)-tiled 32-byte swizzle (also correct), which turns each copy into a 5-D tensor TMA of 32-byte rows;
Lane semantics keeps the SMEM plain (one bulk copy per chunk), and the register layouts are explicit anyway.
Padding (an XLA copy of the rows, only when S is not a multiple of the chunk; the production S = 128K needs
none): the last group with -inf bits, as `pruned.group_maxima`, then whole groups with bits 0xFFFFFFFF,
whose ordered value is the int32 minimum = uint32 key 0: below every bisection candidate (>= 1), so never
counted; their maxima are sliced off the output. g = 2 is not supported (8-byte GMEM strides, which the copy
rejects); g <= 16 and M <= 16384 (128 registers per thread in the bisection, as `kernel_select`).

Cost model (H200, 1024 rows x 131072, g = 8, k = 2048): HBM 512 MiB read + 64 MiB maxima written = 604 MB,
~0.13-0.15 ms at 4.0-4.8 TB/s; streaming ALU ~4 int ops per key (shift, and, xor, 7/8 max) = 0.5 G ops,
~20 us over 132 SMs x 128 lanes; the bisection as `kernel_select` (32 x 16384 compares and adds per row),
which measured 0.18-0.26 ms alone (up to 3 CTAs per SM). Expected: 0.2-0.3 ms if the two CTAs per SM overlap
streaming and bisection well, at worst ~0.4 ms (no overlap), vs 0.55-0.7 ms measured for the XLA group max
(0.35-0.48 ms) plus the threshold kernel (0.18-0.26 ms); whole pruned select ~1.26 -> ~0.95-1.05 ms.

What only the GPU can check (interpret mode and cross-lowering cannot): the times above and that 2 CTAs per
SM are resident (ptxas -v: registers <= 255 per thread and no spills; the bisection keeps 128 values per
thread live, the chunk loop 8 vectors of 4); ptxas accepting the maxima store (Mosaic emits `stmatrix`);
whether one or two 16 KiB bulk copies in flight per CTA keep HBM busy (if not: more buffers, or
chunk_keys=16384, which the benchmark times too); SMEM bank conflicts of the group loads (thread t reads 4g
bytes at 4g * t: Mosaic planned conflict-free loads at g = 4 and 8; g = 16 is a non-optimized load, 4-way
conflicts, whose bandwidth should still exceed an SM's HBM share); the cost of the automatic barriers
(~4 `bar.sync` per chunk: around the maxima store, the proxy fence, the copy issue); whether the proxy fence
(`commit_smem`) before refilling a slot, which the interpret-mode race detector requires (the slot's reads
are generic-proxy accesses, the bulk copy's writes async-proxy ones), costs anything. The bisection is
`kernel_select`'s (latency bound: a dependent add chain and a warpgroup reduction per step); whether its
counting options (b = 2, 4: half or a quarter of the steps and barriers; P: shorter add chains) pay off here,
where the other CTA's streaming may already hide that latency, is for the GPU to tell.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.topk import kernel_select

GROUPS = (4, 8, 16)  # keys per group (g = 2: 8-byte GMEM strides, which the copy rejects)
LANES = kernel_select.LANES  # 128 threads = 128 groups per slab = 128 maxima per SMEM row
MAX_GROUPS = kernel_select.MAX_KEYS  # 16384 maxima per row: 128 registers per thread in the bisection
CHUNK_KEYS = 4096  # keys per bulk copy (16 KiB): 2 CTAs per SM at the defaults
BUFFERS = 2  # SMEM slots of the chunk ring
NEG_INF_BITS = -8388608  # int32 bits of float32 -inf (0xFF800000): pads the last group, as `pruned.group_maxima`
PAD_BITS = -1  # bits 0xFFFFFFFF: ordered int32 minimum = uint32 key 0, below every bisection candidate
_SIGN = -(2**31)  # ordered int32 ^ _SIGN = the uint32 key of `kernel.sortable_keys`


def group_layout(g: int):
  """Register layout of the slabs [A, 128, g]: thread t holds group t of every slab, as g / 4 vectors of 4."""
  vector = min(g, 4)  # 16-byte SMEM loads
  if g == vector:
    return plgpu.Layout.TILED(plgpu.Tiling(((1, LANES, g), (32, g))), warp_dims=(-4,), lane_dims=(-2,),
                              vector_dim=-1)
  return plgpu.Layout.TILED(plgpu.Tiling(((1, LANES, g), (32, g), (vector,))), warp_dims=(-5,), lane_dims=(-3,),
                            vector_dim=-1)


def group_maxima_and_threshold(rows: jax.Array, g: int, k: jax.Array | int, *, chunk_keys: int = CHUNK_KEYS,
                               buffers: int = BUFFERS, bits_per_step: int = 1, partial_sums: int | None = None,
                               interpret=False) -> tuple[jax.Array, jax.Array]:
  """rows float32 [R, S], k int32 [R] or int -> (maxima int32 [R, ceil(S / g)], threshold uint32 [R]).

  maxima = `pruned.group_maxima(rows, g)[1]`, bitwise; threshold = `kernel_select.kth_largest_keys` of their
  uint32 keys (maxima ^ 0x80000000): the largest x with #(keys >= x) >= k, 0 if none.
  bits_per_step, partial_sums: the bisection's counting options (`kernel_select`; same result for all).
  interpret: GPU interpret-mode parameters (CPU tests).
  """
  kernel_select.check_options(bits_per_step, partial_sums)
  if g not in GROUPS:
    raise ValueError(f"g={g} is not supported; allowed: {GROUPS}.")
  slab = LANES * g
  if chunk_keys < slab or chunk_keys % slab:
    raise ValueError(f"chunk_keys={chunk_keys} is invalid for g={g}; allowed: a positive multiple of {slab}.")
  if buffers < 1:
    raise ValueError(f"buffers={buffers} is invalid; allowed: >= 1.")
  n_rows, n = rows.shape
  chunk = min(chunk_keys, -(-n // slab) * slab)  # a short row is one chunk, not a mostly padded one
  padded = -(-n // chunk) * chunk
  if padded // g > MAX_GROUPS:
    raise ValueError(f"rows of {n} keys give {padded // g} groups of g={g} keys; allowed: at most {MAX_GROUPS} "
                     f"groups, i.e. rows of at most {MAX_GROUPS * g} keys.")
  bits = lax.bitcast_convert_type(rows.astype(jnp.float32), jnp.int32)
  if padded > n:
    tail = -n % g
    bits = jnp.pad(bits, ((0, 0), (0, tail)), constant_values=NEG_INF_BITS)
    bits = jnp.pad(bits, ((0, 0), (0, padded - n - tail)), constant_values=PAD_BITS)
  n_chunks, slabs = padded // chunk, chunk // slab
  n_buffers = min(buffers, n_chunks)
  want = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n_rows,))
  maxima, threshold = plgpu.kernel(
      functools.partial(_kernel, bits_per_step=bits_per_step, partial_sums=partial_sums),
      out_type=(jax.ShapeDtypeStruct((n_rows, padded // g // LANES, LANES), jnp.int32),
                jax.ShapeDtypeStruct((n_rows,), jnp.uint32)),
      scratch_types=dict(chunks_smem=plgpu.SMEM((n_buffers, slabs, LANES, g), jnp.int32),
                         barriers=plgpu.Barrier(num_barriers=n_buffers),
                         maxima_smem=plgpu.SMEM((padded // g // LANES, LANES), jnp.int32)),
      grid=(n_rows,),
      grid_names=("r",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Lane,
          reduction_scratch_bytes=kernel_select.reduction_scratch_bytes(bits_per_step)),  # 2048 B at b = 1
      kernel_name="_kernel",  # not "anonymous" (the name of a partial) in lowered modules and profiles
      interpret=interpret,
  )(bits.reshape(n_rows, n_chunks, slabs, LANES, g), want)
  return maxima.reshape(n_rows, -1)[:, :-(-n // g)], threshold


def _kernel(bits_ref, k_ref, maxima_ref, out_ref, *, chunks_smem, barriers, maxima_smem, bits_per_step,
            partial_sums):
  r = lax.axis_index("r")
  n_chunks, slabs, _, g = bits_ref.shape[1:]
  n_buffers = chunks_smem.shape[0]
  layout = group_layout(g)

  def fetch(c, slot):
    plgpu.copy_gmem_to_smem(bits_ref.at[r, c], chunks_smem.at[slot], barriers.at[slot],
                            oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)  # contiguous: one bulk copy

  for c in range(n_buffers):
    fetch(c, c)

  def chunk(c, carry):
    slot = lax.rem(c, n_buffers)
    plgpu.barrier_wait(barriers.at[slot])
    # [slabs, 128, g]: one group per thread and slab. g = 16: 4-way bank conflicts, which Mosaic only emits
    # when asked for a non-optimized load.
    bits = plgpu.load(chunks_smem.at[slot], layout=layout, optimized=g < 16)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the float total order as int32 (-0.0 < +0.0)
    maxima_smem[pl.ds(c * slabs, slabs)] = ordered.max(axis=2)  # [slabs, 128]: thread-local maxima

    @pl.when(c + n_buffers < n_chunks)
    def _():
      plgpu.commit_smem()  # the slot's reads (generic proxy) before the copy (async proxy) overwrites it
      fetch(c + n_buffers, slot)
    return carry

  lax.fori_loop(0, n_chunks, chunk, 0)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(maxima_smem, maxima_ref.at[r])  # overlaps the bisection (both only read the SMEM)
  options = dict(bits_per_step=bits_per_step, partial_sums=partial_sums)
  maxima = kernel_select.load_row(maxima_smem, **options)  # [M / 128, 128]: strided, or `COLUMNS` if stacked
  keys = (maxima ^ _SIGN).astype(jnp.uint32)
  out_ref[r] = kernel_select.bisect(keys, k_ref[r], **options)
  plgpu.wait_smem_to_gmem(0)
