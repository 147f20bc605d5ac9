"""Sparse MLA backward on Hopper with Pallas Mosaic GPU: recompute from the lse, dq in registers, dkv by
TMA reduce-add into the selected latent rows.

FlashAttention-2's backward (Dao 2023, Alg. 2) in the MQA form of DeepSeek-V3.2's sparse attention
(arXiv 2512.02556, section 2.1): for one token, with P = exp(scale q.k - lse) over its K selected
576-dim entries [c (512) | k_rope (64)],
  dP = dO V^T, dS = P (dP - delta + dlse) scale, delta = rowsum(dO * O) (computed in XLA),
  dq = dS K, dkv[idx] += dS^T q + [P^T dO | 0].
Same function as the chunked XLA backward of `chunked_bwd` (the `deterministic=True` path).

One CTA owns one token and a tile of 64 heads, as in the forward (`kernel_fwd`), with three warpgroups:
  * wg 2 (memory): per block of `block_k` selected keys, the index block, then one TMA per selected row
    and 64-column line, all on one barrier (the forward's gather). As in the forward, a second gather
    warpgroup does not fit the H200: ptxas caps four warpgroups at 65536 / 512 = 128 registers per
    thread, and wg 1's dq accumulators alone (64 x 320 f32 at 576 / 512) take 160. As in the forward, the
    default gather is `cp_async_gather` (all 128 threads of wg 2 copy 16-byte pieces); `gather="tma"`
    issues per-row TMA copies from `gather_warps` warps instead. On the H200 (8K tokens, 128 heads,
    2026-11-29): TMA from 1 warp 68.3-69.2 ms, from 4 warps 58.3-59.3 ms, cp.async 53.3 ms (110 TFLOP/s).
  * wg 0: S^T = K Q^T and dP^T = V dO^T (keys x heads, so that P^T and dS^T are ready-made wgmma
    operands for dkv), P^T, dS^T to SMEM; then dq[:, :C/2] += dS K and the dkv columns [0, C/2).
  * wg 1: dq[:, C/2:] += dS K (latent right half and rope) and the dkv columns [C/2, C + R).
dkv is computed in slabs of 128 columns (64 where a chunk is narrower, e.g. the rope part; `slab_cols`),
acc = dS^T q[:, slab] + P^T dO[:, slab] (64 keys x 128 f32), staged in SMEM and added into the f32 dkv output
with one TMA reduce-add per selected row and slab (TMA reductions are atomic per element; the order of
additions, hence the rounding, varies run to run). An invalid (-1)
key has P = dS = 0 and adds zeros to row 0.

SMEM (576 / 512, bf16): Q 72 KiB + dO 64 KiB + one key block 72 KiB + P^T, dS^T 16 KiB = 224 KiB of the
227 KiB per block. Nothing else fits, so each warpgroup stages its dkv slabs in its own part of the key
block (one 32 KiB f32 slab, or with `slab_cols=64` two 16 KiB slots, reused once the TMA has read them) once
its dq product no longer reads it;
the next block's gather starts when the reductions have been read out of SMEM. The key block is therefore
single-buffered: the gather does not overlap this CTA's matmuls. Two things shorten the path between blocks
(session 7 of 2026-11-29, both defaults): the index block is double-buffered, so block j + 1's indices load
while block j is computed (`prefetch_idx`), and the key block is released per chunk (`split_release`): the
gather refills chunk 0 (wg 0's staging) as soon as wg 0's slabs have been read, the rest once wg 1's have.
On the H200 (4096 queries, 128 heads, K = 2048): 28.7 ms = 203.7 TFLOP/s over 8K keys against 30.6 ms = 191.2
without either (28.9 ms with the prefetch alone), 42.2 against 42.9 ms over 128K keys; without the dkv
additions 16.8 against 18.4 ms. Adding the 64 rope columns of dkv from registers (`red_add`, a fifth fewer TMA
operations) was slower (32.5 ms over 8K keys, 46.5 over 128K) and was removed (in the same run it also showed a
race: wg 1's final dq store reused the Q rope SMEM that wg 0's last rope slab still read).
The two head tiles of a token are launched side by side (`adjacent_tiles`, `kernel_fwd.token_grid`): the second
one's reduce-adds and row gathers then hit L2, which took the kernel from 38.1 to 32.8 ms over 32K keys and from
42.2 to 34.7 over 128K (dkv of 75 / 302 MiB no longer fits in L2, and the random selections have no locality).
The issue section then measured 205.8 / 177.8 / 168.9 / 163.9 TFLOP/s over 8K / 32K / 64K / 128K keys.
`reduce="bulk"` (opt-in) issues the rows of a staged slab as non-tensor bulk reduce-adds, one row per thread
(`bulk_reduce`). It is as fast as the TMA path (29.2 vs 28.9 ms over 8K keys, 41.1 vs 42.4 over 128K before
`adjacent_tiles`), so the float32 atomics themselves, not their issue, bound the kernel.

`reduce="red"` (opt-in) adds dkv from registers instead
(`pallas_kernels.mosaic.red_add`: `red.global.add.v4.f32`, every thread its own fragments), so nothing is staged: each
warpgroup releases the key block and the index block right after its dq product (having loaded its rows'
indices), and a `ds_free` barrier keeps wg 0 from overwriting P^T / dS^T while wg 1's dkv slabs still read them.
Measured on the H200 (4096 queries, 128 heads, K = 2048, session 5 of 2026-11-29): without any dkv additions
this structure takes 11.0 ms against 22.2 for the staged one (the gather now overlaps the matmuls); with them,
over 8K keys (an 18 MiB dkv) 39.0 ms = 150 TFLOP/s against 42.4 ms (138) for the TMA reduce-adds from 4 warps,
but over 128K keys (302 MiB) 62.4 ms against 53.2 (per-thread reductions that miss L2 cost more than the TMA
unit's bulk ones), and at the parity model's shapes (16 heads, 320-dim entries, K = 512, 8K keys) 5.72 ms against
5.23. So "tma" stays the default. The dkv additions (38.7 GB of float32 adds at V3.2 shapes) bound the kernel,
through the number of reduce-add operations more than their bytes: 128-column slabs (half the operations) took
the TMA path from 138 to 187-194 TFLOP/s over 8K keys and from 110 to 133-135 over 128K (session 6).

Tried and removed (session 6 of 2026-11-29): summing the two 64-head tiles' dkv slabs inside a 2-CTA cluster
through DSMEM before the reduce-adds (half the atomics). Exact, but 80.6 ms against 42.6 over 8K keys and 85.2
against 53.5 over 128K; 61 ms even without any reduce-adds: the per-slab cluster barriers and fences serialise the
two CTAs (benchmarks/results/README.md).

Tried and removed (session 9 of 2026-11-30), both to make the dkv rows that CTAs add into at the same time hit
L2: with the indices sorted (as `topk_indices` returns them; alone the same speed as random order), each CTA
started at key block (globaltimer // period) % steps and wrapped around, so that the CTAs running at once worked
on the same stretch of keys: 37.3-40.0 ms over 128K keys against 35.4-36.0 (periods 10-24 us), no gain over 32K;
and a token's second head tile started one block later than the first, so that the two did not add into the same
rows at once: 34.5 / 36.5 ms against 32.2 / 35.4 over 32K / 128K keys. Concurrent atomics on shared rows cost
more than the L2 misses they save.

GPU interpret mode does not implement TMA reductions: there each staged slab is copied whole into a
[B, T, N/64, K, Dk] buffer of per-token partials that XLA scatter-adds, so the tests check everything
but the reduce-add TMAs (which the cross-lowering test compiles). On the H200 (benchmarks/results, 2026-11-29)
the kernel's dq / dkv errors equal the chunked path's (3.2e-3 / 4.8e-3 rel.); with the cp.async gather it
runs at 110 TFLOP/s for 128 heads (84 with one TMA gather warp), 138 with the reduce-adds from 4 warps.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import bulk_reduce, cp_async_gather, red_add
from pallas_kernels.mosaic.row_copies import issue_row_copies
from pallas_kernels.sparse_mla import kernel_fwd
from pallas_kernels.sparse_mla.kernel_fwd import HEAD_TILE

SLAB = 64  # dkv columns per staged slab
# Columns per TMA reduce-add (`slab_cols`): 64, or 128 so that each selected row takes half as many reduce-add
# operations (512 instead of 256 bytes each), at the price of one staging buffer per warpgroup instead of two (a
# 64 x 128 f32 slab fills the 32 KiB of its key-block chunk). The number of operations, not their bytes, was what
# bounded the kernel: on the H200 (4096 queries, 128 heads, K = 2048) 128 columns took 30.2 ms = 194 TFLOP/s
# against 42.3 ms = 138 over 8K keys, 43.3 ms = 135 against 53.0 = 110 over 128K keys, the same gradients. The
# default (None) is 128 where the value chunks are at least 128 columns wide.
SLAB_COLS = (64, 128)
# How dkv is added: staged in SMEM + TMA reduce-adds from a few lanes ("tma") or non-tensor bulk reduce-adds, one
# row per thread ("bulk", `bulk_reduce`); or `red_add` from registers ("red").
REDUCES = ("tma", "red", "bulk")

_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _mma(acc, pairs, shape, interpret):
  """acc + sum of a @ b over `pairs` (acc None: zero). GPU interpret mode has no `run_state` over
  accumulators, so there a fresh accumulator is added in registers."""
  def products(acc_ref):
    for a, b in pairs:
      plgpu.wgmma(acc_ref, a, b)

  if acc is None or interpret:
    out = pl.run_scoped(lambda acc_ref: (products(acc_ref), acc_ref[...])[1], plgpu.ACC(shape, jnp.float32))
    return out if acc is None else acc + out
  return pl.run_state(products)(plgpu.ACC.init(acc))


def _body(q_ref, kv_ref, idx_ref, lse_ref, dd_ref, do_ref, dq_ref, dkv_ref, q_smem, do_smem, kv_smem, p_smem,
          ds_smem, idx_smem, q_bar, kv_ready, idx_ready, kv_free, ds_ready, ds_free, *, chunks, steps,
          scale, bk, cfg, interpret, skip, reduce_warps, reduce, slab_cols, prefetch_idx, split_release, n_tiles):
  p_smem, (lse_smem, dd_smem) = p_smem
  kv_parts = [tuple(parts) for parts in kv_smem]  # a RefUnion iterates over its views
  kv_smem, kv_lines, stage_smem, wide_smem = zip(*(parts + (None,) * (4 - len(parts)) for parts in kv_parts))
  b, t, tile = kernel_fwd.grid_position(n_tiles, cfg.adjacent_tiles)
  h0 = tile * HEAD_TILE
  wg = lax.axis_index("wg")
  half, dtype = chunks[0][1], q_ref.dtype
  heads = pl.ds(h0, HEAD_TILE)
  slot_of = lambda j: lax.rem(j, 2) if prefetch_idx else 0  # idx_smem / idx_ready slot of block j
  staged = reduce != "red"  # dkv slabs staged in the key block's SMEM, then reduce-added from there

  def add_rows(slab, col, slot):
    """The reduce-adds of a staged slab [bk, width]: dkv[b, idx[r], col:col+width] += slab[r]."""
    width = slab.shape[-1]
    if reduce == "bulk":  # one non-tensor bulk reduction per row, each from its own thread
      bulk_reduce.add_rows(slab, dkv_ref.at[b], idx_smem.at[slot], col=col)
      plgpu.commit_smem_to_gmem_group()
      return

    def add_row(r, row):
      plgpu.copy_smem_to_gmem(slab.at[pl.ds(r, 1)], dkv_ref.at[b, pl.ds(row, 1), pl.ds(col, width)],
                              commit_group=False, reduction_op="add")

    # From `reduce_warps` lanes; every thread then commits (and later awaits) its own bulk group.
    issue_row_copies(bk, reduce_warps, lambda r: idx_smem[slot, r], add_row)
    plgpu.commit_smem_to_gmem_group()

  def reduce_slab(acc, stage, j, slab, col, rows):
    """dkv[b, idx[r], col:col+w] += acc[r] for the rows of block j (acc [bk, w]; slab counts from 0 per block).

    stage: (two [bk, 64] f32 slots, one [bk, 128] f32 view) of this warpgroup's key-block chunk."""
    if not staged:  # from registers, every thread its own fragments (`red_add`); rows: idx broadcast
      if skip != "reduce":
        red_add.add_rows(dkv_ref.at[b], rows, acc, col=col)
      return
    slots, wide = stage
    if slab_cols == SLAB:  # two slots: a slab is staged while the one before it is still being read
      buf = slots.at[slab % 2]
      if slab >= 2:
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the slab staged two slabs ago has been read
    else:  # one buffer: the previous slab must have been read (the next slab's wgmma ran meanwhile)
      buf = wide if acc.shape[1] == wide.shape[1] else slots.at[0]
      if slab >= 1:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    buf[...] = acc
    plgpu.commit_smem()
    if interpret:  # per-block partial sums, scatter-added outside
      plgpu.copy_smem_to_gmem(buf, dkv_ref.at[b, t, tile, pl.ds(j * bk, bk),
                                                  pl.ds(col, acc.shape[1])])
      return

    if skip == "reduce":  # benchmark diagnostics: no dkv reduce-adds
      return
    add_rows(buf, col, slot_of(j))

  def slabs(start, end):
    """(column, width) of the staged slabs covering dkv columns [start, end): `slab_cols` wide, never across a
    key chunk (so a narrower one at a chunk's end, e.g. the 64 rope columns)."""
    out = []
    for off, width in chunks:
      for col in range(max(off, start), min(off + width, end), slab_cols):
        out.append((col, min(slab_cols, off + width - col)))
    return out

  def slab_product(col, width):
    """dS^T q[:, col:col+width] (+ P^T dO[:, col:col+width] on the latent columns): [bk, width] f32."""
    (qc, qoff), = [(k, col - off) for k, (off, w) in enumerate(chunks) if off <= col < off + w]
    pairs = [(ds_smem, q_smem[qc].at[:, pl.ds(qoff, width)])]
    if qc < 2:
      pairs.append((p_smem, do_smem[qc].at[:, pl.ds(qoff, width)]))
    return _mma(None, pairs, (bk, width), interpret)

  def dkv_slabs(j, cols, stage, rows=None):
    """dkv slabs `cols` ((column, width) pairs) of this block, added as `reduce` says."""
    for i, (col, width) in enumerate(cols):
      reduce_slab(slab_product(col, width), stage, j, i, col, rows)
    if staged:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def dest_rows(idx):
    """The dkv row of every element of a (keys x 64 columns) slab: idx (invalid -1 -> row 0, adding zeros)."""
    return lax.broadcast_in_dim(jnp.maximum(idx, 0), (bk, SLAB), [0])

  def dq_product(acc, chunk):
    return _mma(acc, [(ds_smem.transpose((1, 0)), kv_smem[chunk])], acc.shape, interpret)

  def zeros(width):
    return plgpu.layout_cast(jnp.zeros((HEAD_TILE, width), jnp.float32), plgpu.Layout.WGMMA)

  def store_dq(acc, chunk):
    off, width = chunks[chunk]
    q_smem[chunk][...] = acc.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem[chunk], dq_ref.at[b, t, heads, pl.ds(off, width)])

  def wait_block(j):
    plgpu.barrier_wait(idx_ready.at[slot_of(j)])
    plgpu.barrier_wait(kv_ready)

  @pl.when(wg == 0)
  def _scores_left_half():
    plgpu.set_max_registers(kernel_fwd.COMPUTE_REGISTERS, action="increase")
    for (off, width), smem in zip(chunks, q_smem):
      plgpu.copy_gmem_to_smem(q_ref.at[b, t, heads, pl.ds(off, width)], smem, q_bar)
    for c, smem in enumerate(do_smem):
      plgpu.copy_gmem_to_smem(do_ref.at[b, t, heads, pl.ds(c * half, half)], smem, q_bar)
    plgpu.copy_gmem_to_smem(lse_ref.at[b, t, heads], lse_smem, q_bar)
    plgpu.copy_gmem_to_smem(dd_ref.at[b, t, heads], dd_smem, q_bar)
    plgpu.barrier_wait(q_bar)
    heads_layout = plgpu.Layout.WGMMA.reduce(0)
    lse = lax.broadcast_in_dim(plgpu.load(lse_smem, layout=heads_layout), (bk, HEAD_TILE), [1])
    dd = lax.broadcast_in_dim(plgpu.load(dd_smem, layout=heads_layout), (bk, HEAD_TILE), [1])
    log2_scale = scale * math.log2(math.e)
    cols = slabs(0, half)

    def step(j, dq):
      wait_block(j)
      st = _mma(None, [(k, q.transpose((1, 0))) for k, q in zip(kv_smem, q_smem)], (bk, HEAD_TILE), interpret)
      dpt = _mma(None, [(kv_smem[c], do_smem[c].transpose((1, 0))) for c in range(2)], (bk, HEAD_TILE),
                 interpret)
      idx = plgpu.load(idx_smem.at[slot_of(j)], layout=plgpu.Layout.WGMMA.reduce(1))
      bias = lax.broadcast_in_dim(jnp.where(idx >= 0, 0.0, -jnp.inf).astype(jnp.float32), st.shape, [0])
      pt = jnp.exp2(st * log2_scale - lse + bias)
      if not staged:  # wg 1 may still read the previous block's P^T and dS^T (its dkv slabs)
        @pl.when(j > 0)
        def _():
          plgpu.barrier_wait(ds_free)
      p_smem[...] = pt.astype(dtype)
      ds_smem[...] = (pt * (dpt - dd) * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(ds_ready)
      dq = dq_product(dq, 0)
      if not staged:  # the dkv slabs read neither the key block nor idx_smem: release them now
        plgpu.barrier_arrive(kv_free.at[0])
        dkv_slabs(j, cols, None, dest_rows(idx))
      else:
        dkv_slabs(j, cols, (stage_smem[0], wide_smem[0]))
        plgpu.barrier_arrive(kv_free.at[0])
      return dq

    dq = lax.fori_loop(0, steps, step, zeros(half))
    if not staged:
      plgpu.barrier_wait(ds_free)  # observe wg 1's last release
    store_dq(dq, 0)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _right_half_and_rope():
    plgpu.set_max_registers(kernel_fwd.COMPUTE_REGISTERS, action="increase")
    plgpu.barrier_wait(q_bar)
    v_dim = chunks[2][0]
    cols = slabs(half, v_dim + chunks[2][1])

    def step(j, carry):
      dq, dq_rope = carry
      wait_block(j)
      plgpu.barrier_wait(ds_ready)
      if not staged:
        rows = dest_rows(plgpu.load(idx_smem.at[slot_of(j)], (), layout=plgpu.Layout.WGMMA.reduce(1)))
      dq, dq_rope = dq_product(dq, 1), dq_product(dq_rope, 2)
      if not staged:  # as wg 0: release the key block and idx_smem, then P^T and dS^T after the slabs
        plgpu.barrier_arrive(kv_free.at[1])
        dkv_slabs(j, cols, None, rows)
        plgpu.barrier_arrive(ds_free)
      else:
        dkv_slabs(j, cols, (stage_smem[1], wide_smem[1]))
        plgpu.barrier_arrive(kv_free.at[1])
      return dq, dq_rope

    dq, dq_rope = lax.fori_loop(0, steps, step, (zeros(half), zeros(chunks[2][1])))
    store_dq(dq, 1)
    store_dq(dq_rope, 2)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _gather():
    plgpu.set_max_registers(kernel_fwd.GATHER_REGISTERS, action="decrease")

    def load_idx(j):
      plgpu.copy_gmem_to_smem(idx_ref.at[b, t, pl.ds(j * bk, bk)], idx_smem.at[slot_of(j)],
                              idx_ready.at[slot_of(j)])

    def await_release(j, half):
      """Block j - 1's release of the key block's half (0: chunk 0, wg 0's; 1: the rest, wg 1's)."""
      @pl.when(j > 0)
      def _():
        plgpu.barrier_wait(kv_free.at[half])

    def prefetch_next(j):
      """With `prefetch_idx`, the indices of block j + 1 into the slot that block j - 1 used (released)."""
      if prefetch_idx:
        @pl.when(j + 1 < steps)
        def _():
          load_idx(j + 1)

    if prefetch_idx:
      load_idx(0)

    @pl.loop(0, steps)
    def _block(j):
      await_release(j, 0)
      if not split_release:
        await_release(j, 1)
      if not prefetch_idx:
        load_idx(j)
      plgpu.barrier_wait(idx_ready.at[slot_of(j)])
      idx_j = idx_smem.at[slot_of(j)]
      if not split_release:
        prefetch_next(j)

      def copy_row(r, row):
        for (off, width), smem, lines in zip(chunks, kv_smem, kv_lines):
          if lines is None:
            plgpu.copy_gmem_to_smem(kv_ref.at[b, pl.ds(row, 1), pl.ds(off, width)], smem.at[pl.ds(r, 1)],
                                    kv_ready)
            continue
          for ct in range(width // 64):
            line = ((r // 8) * (width // 64) + ct) * 8 + r % 8
            plgpu.copy_gmem_to_smem(kv_ref.at[b, pl.ds(row, 1), pl.ds(off + 64 * ct, 64)],
                                    lines.at[pl.ds(line, 1)], kv_ready)

      if cfg.gather == "cp_async":  # all 128 threads copy 16-byte pieces; wait, fence, then all arrive
        def issue(part):
          if skip != "copies":
            cp_async_gather.issue_block(kv_ref.at[b], idx_j, [kv_lines[c] for c in part],
                                        chunks=[chunks[c] for c in part], rows=bk)

        if split_release:  # chunk 0 as soon as wg 0 has released it, the rest once wg 1 has
          issue([0])
          await_release(j, 1)
          prefetch_next(j)
          issue(range(1, len(chunks)))
        else:
          issue(range(len(chunks)))
        cp_async_gather.wait(0)
        plgpu.commit_smem()
        plgpu.barrier_arrive(kv_ready)
        return
      # Only the row gathers are spread over warps (gather_warps > 1); the per-row dkv reduce-adds of wg 0
      # and wg 1 (`reduce_slab`) are tracked by bulk async groups, which belong to the issuing thread.
      issue_row_copies(bk, cfg.gather_warps, lambda r: idx_j[r], copy_row)

    for half in range(2):  # observe the last releases, so that every barrier phase is waited on
      plgpu.barrier_wait(kv_free.at[half])


def _kv_buffer(bk: int, width: int, dtype, stage: bool, interpret, gather: str = "tma", wide: bool = False):
  """SMEM for one column chunk of the gathered key block: its wgmma view, its per-row TMA view (None in
  interpret mode) and, in the same bytes, two f32 dkv staging slots where `stage` (and, where `wide`, one
  [bk, 128] f32 staging view over the same bytes: `slab_cols=128`).

  As in the forward (`kernel_fwd._kv_buffer`), single rows land through a view of the bytes as swizzled
  128-byte lines; with gather="cp_async" the second view is flat, written at swizzled addresses by
  `cp_async_gather`. Interpret mode models views logically, so there the views are separate buffers.
  """
  tiled = plgpu.SMEM((bk, width), dtype, transforms=_TRANSFORMS)
  slots = plgpu.SMEM((2, bk, SLAB), jnp.float32) if stage else None
  wide_view = (plgpu.SMEM((bk, 2 * SLAB), jnp.float32),) if stage and wide else ()
  if interpret:
    if gather == "cp_async":
      raise ValueError("gather='cp_async' runs inline Mosaic GPU code, which GPU interpret mode cannot run.")
    return (tiled, None, slots, *wide_view)
  lines = plgpu.SMEM((bk * width,), dtype) if gather == "cp_async" else plgpu.SMEM(
      (bk * width // 64, 64), dtype, transforms=(plgpu.TilingTransform((1, 64)), plgpu.SwizzleTransform(128)))
  return plgpu.RefUnion(tiled, lines, slots, *wide_view) if stage else plgpu.RefUnion(tiled, lines)


def _scratch(chunks, bk, dtype, interpret, gather="tma", wide=False):
  smem = functools.partial(plgpu.SMEM, dtype=dtype, transforms=_TRANSFORMS)
  half = chunks[0][1]
  copies_per_row = len(chunks) if interpret else sum(w // 64 for _, w in chunks)
  rows = (plgpu.SMEM((HEAD_TILE,), jnp.float32), plgpu.SMEM((HEAD_TILE,), jnp.float32))
  return (
      tuple(smem((HEAD_TILE, w)) for _, w in chunks),
      (smem((HEAD_TILE, half)), smem((HEAD_TILE, half))),
      tuple(_kv_buffer(bk, w, dtype, c < 2, interpret, gather, wide) for c, (_, w) in enumerate(chunks)),
      # The lse and (delta - dlse) rows are read into registers before P^T is first written.
      (plgpu.RefUnion if not interpret else lambda *refs: refs)(smem((bk, HEAD_TILE)), rows),
      smem((bk, HEAD_TILE)),
      plgpu.SMEM((2, bk), jnp.int32),  # two slots: block j + 1's indices land while block j is reduced
      plgpu.Barrier(num_arrivals=len(chunks) + 4),
      plgpu.Barrier(num_arrivals=1 if gather == "cp_async" else copies_per_row * bk),
      plgpu.Barrier(num_barriers=2),  # idx_ready, per slot
      plgpu.Barrier(num_barriers=2),  # kv_free: [0] chunk 0 released by wg 0, [1] the rest by wg 1
      plgpu.Barrier(),
      plgpu.Barrier(),  # ds_free: wg 1 has finished reading P^T and dS^T (reduce="red")
  )


def sparse_mla_bwd(q, kv, indices, out, lse, do, dlse, *, scale: float, v_dim: int, block_k: int = 64,
                   gather_warps: int = 4, gather: str = "cp_async", reduce_warps: int = 4,
                   reduce: str = "tma", slab_cols: int | None = None, prefetch_idx: bool = True,
                   split_release: bool | None = None, adjacent_tiles: bool = True, skip: str = "",
                   interpret=False) -> tuple[jax.Array, jax.Array]:
  """Gradients of `reference.sparse_mla` w.r.t. q [B, T, N, Dk] and kv [B, S, Dk] from the saved lse,
  given the cotangents of out (`do`, [B, T, N, v_dim]) and of lse (`dlse`, [B, T, N]). `gather`
  ("tma" or "cp_async") and `gather_warps` (1, 2 or 4) are those of `kernel_fwd.Config`. `reduce_warps`
  (1, 2 or 4; default 4: 138 vs 110 TFLOP/s with 1 on the H200) spreads each warpgroup's dkv reduce-adds over
  that many of its warps, as `gather_warps` does the TMA gathers. `reduce` ("tma", the default, "bulk" or "red")
  picks how dkv is added: TMA reduce-adds of slabs staged in the key block's SMEM ("tma"), the same slabs added
  by non-tensor bulk reduce-adds issued one row per thread ("bulk", `bulk_reduce`; as fast on the H200), or
  `red_add` reductions from registers, which need no staging, so that both compute
  warpgroups release the key block (and the gather of the next block starts) right after their dq products
  instead of after their dkv slabs. `slab_cols` (staged): columns per staged slab and per reduce-add, 64 or
  128 (SLAB_COLS; 128: half the reduce-add operations, one staging buffer per warpgroup); None: 128 when staged
  where the value chunks are at least 128 wide, else 64. `prefetch_idx` (default): the gather loads block
  j + 1's indices (two slots) while block j is computed, instead of after block j's release (one memory round
  trip less between blocks). `split_release` (cp.async gather with `prefetch_idx`; None: wherever those hold):
  the gather refills the key block's first chunk as soon as wg 0 has released it, the rest once wg 1 has,
  instead of waiting for both. `adjacent_tiles`: the CTA launch order of `kernel_fwd.Config`. `skip` is for
  benchmark diagnostics only (the gradients are then wrong): "copies" leaves out the cp.async row copies,
  "reduce" the dkv reduce-adds, so that their share of the time shows."""
  bsz, t, n, dk = q.shape
  chunks = kernel_fwd.column_chunks(dk, v_dim)
  if block_k != 64:
    raise ValueError(f"block_k={block_k}: the dkv wgmma has the keys as its M, which is 64.")
  cfg = kernel_fwd.Config(block_k=block_k, gather_warps=gather_warps, gather=gather,  # validation
                          adjacent_tiles=adjacent_tiles)
  if reduce_warps not in (1, 2, 4):
    raise ValueError(f"reduce_warps={reduce_warps} must be one of (1, 2, 4).")
  if reduce not in REDUCES:
    raise ValueError(f"reduce={reduce!r} must be one of {REDUCES}.")
  if reduce != "tma" and interpret:  # "red" and "bulk" are inline Mosaic GPU code
    raise ValueError(f"reduce={reduce!r} runs inline Mosaic GPU code, which GPU interpret mode cannot run.")
  if slab_cols is None:
    slab_cols = 2 * SLAB if reduce != "red" and chunks[0][1] >= 2 * SLAB else SLAB
  if slab_cols not in SLAB_COLS or (slab_cols != SLAB and reduce == "red"):
    raise ValueError(f"slab_cols={slab_cols} must be one of {SLAB_COLS}, and {SLAB} with reduce={reduce!r}.")
  if split_release is None:
    split_release = gather == "cp_async" and prefetch_idx
  if split_release and (gather != "cp_async" or not prefetch_idx):
    raise ValueError(f"split_release=True needs gather='cp_async' (got {gather!r}) and prefetch_idx=True (got "
                     f"{prefetch_idx}): wg 1's reduce-adds still read the block's indices when chunk 0 is refilled.")
  n_tiles = -(-n // HEAD_TILE)
  if skip not in ("", "reduce") and not (skip == "copies" and gather == "cp_async"):
    raise ValueError(f"skip={skip!r} must be '', 'reduce' or (with gather='cp_async') 'copies'.")
  dtype = q.dtype
  delta = jnp.einsum("btnd,btnd->btn", out.astype(jnp.float32), do.astype(jnp.float32))
  lse2 = jnp.where(jnp.isfinite(lse), lse, 0.0) * math.log2(math.e)
  n_pad = -n % HEAD_TILE
  pad_heads = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, n_pad)] + [(0, 0)] * (x.ndim - 3))
  q, do = pad_heads(q), pad_heads(do.astype(dtype))
  lse2, dd = pad_heads(lse2), pad_heads(delta - dlse.astype(jnp.float32))
  k_pad = -indices.shape[-1] % block_k
  indices = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad)), constant_values=-1)
  body = functools.partial(_body, chunks=chunks, steps=indices.shape[-1] // block_k, scale=scale, bk=block_k,
                           cfg=cfg, interpret=bool(interpret), skip=skip, reduce_warps=reduce_warps,
                           reduce=reduce, slab_cols=slab_cols, prefetch_idx=prefetch_idx,
                           split_release=split_release, n_tiles=n_tiles)
  grid, grid_names = kernel_fwd.token_grid(n_tiles, bsz, t, adjacent_tiles)
  kernel = plgpu.kernel(
      body,
      out_type=(),
      scratch_types=_scratch(chunks, block_k, dtype, bool(interpret), gather, slab_cols != SLAB),
      grid=grid,
      grid_names=grid_names,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                                          unsafe_no_auto_barriers=True),
      interpret=interpret,
  )

  def run(refs):
    kernel(q, kv.astype(dtype), indices, lse2, dd, do, *refs)

  # dq and dkv are kernel operands written in place: dkv must start at zero for the reductions.
  dkv_shape = (bsz, t, (n + n_pad) // HEAD_TILE, *indices.shape[2:], dk) if interpret else kv.shape
  dq, dkv = pl.run_state(run)((jnp.zeros(q.shape, dtype), jnp.zeros(dkv_shape, jnp.float32)))
  if interpret:
    rows = jnp.where(indices >= 0, indices, 0)
    dkv = jax.vmap(lambda r, g: jnp.zeros(kv.shape[1:], jnp.float32).at[r].add(g))(rows, dkv.sum(2))
  return dq[:, :, :n], dkv.astype(kv.dtype)
