"""Sparse MLA backward on Hopper with Pallas Mosaic GPU: recompute from the lse, dq in registers, dkv by TMA
reduce-add into the selected latent rows.

FlashAttention-2's backward (Dao 2023, Alg. 2) in the MQA form of DeepSeek-V3.2's sparse attention (arXiv
2512.02556, section 2.1): for one token, with P = exp(scale q.k - lse) over its K selected 576-dim entries
[c (512) | k_rope (64)],
  dP = dO V^T, dS = P (dP - delta + dlse) scale, delta = rowsum(dO * O) (computed in XLA),
  dq = dS K, dkv[idx] += dS^T q + [P^T dO | 0].
Same function as the chunked XLA backward of `chunked_bwd` (the API's `deterministic=True` path).

One CTA owns one token and a tile of 64 heads, launched as in the forward (`kernel_fwd.token_grid`: the head
tiles of a token side by side, so that the second one's gathers and reduce-adds hit L2). Three warpgroups:
  * wg 2 (memory): per block of 64 selected keys, the rows gathered by cp.async as in the forward (in interpret
    mode by TMA). Block j + 1's indices load into a second slot while block j is computed, and the key block is
    refilled per chunk: chunk 0 as soon as wg 0 has released it, the rest once wg 1 has.
  * wg 0: S^T = K Q^T and dP^T = V dO^T (keys x heads, so that P^T and dS^T are ready-made wgmma operands for
    dkv), P^T, dS^T to SMEM; then dq[:, :C/2] += dS K and the dkv columns [0, C/2).
  * wg 1: dq[:, C/2:] += dS K (latent right half and rope) and the dkv columns [C/2, C + R).
dkv is computed in slabs of 128 columns (64 where a chunk is narrower, e.g. the rope part), acc = dS^T q[:, slab]
+ P^T dO[:, slab] (64 keys x 128 f32), staged in SMEM and added into the f32 dkv output with one TMA reduce-add
per selected row and slab, issued from one lane of each of the 4 warps (`mosaic.row_copies`): the number of
reduce-add operations, more than their bytes, bounds this part, hence slabs as wide as the staging space allows.
An invalid (-1) key has P = dS = 0 and adds zeros to row 0.

SMEM (576 / 512, bf16): Q 72 KiB + dO 64 KiB + one key block 72 KiB + P^T, dS^T 16 KiB = 224 KiB of the 227 KiB
per block. Nothing else fits, so each warpgroup stages its dkv slabs in its own part of the key block once its dq
product no longer reads it (one 32 KiB f32 slab, or at 64 columns two 16 KiB slots), and the key block is
single-buffered: the gather does not overlap this CTA's matmuls.

Limits: the forward's widths and dtype (`kernel_fwd.supports`). TMA reductions are atomic per element, so dkv's
rounding varies from run to run (the API's `deterministic=True` takes the chunked XLA backward instead). The float32
atomics (38.7 GB of adds at V3.2 shapes) bound the kernel, the more so once dkv no longer fits in L2 (32K+ keys).
GPU interpret mode implements no TMA reductions: there each staged slab is copied whole into a [B, T, N/64, K, Dk]
buffer of per-token partials that XLA scatter-adds, so the CPU tests check everything but the reduce-adds, which
the cross-lowering tests compile.
Today: 165-205 TFLOP/s over 8K-128K keys at V3.2 shapes on an H200 (benchmarks/sparse_mla.md).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dispatch import interpreting
from pallas_kernels.mosaic import cp_async_gather
from pallas_kernels.mosaic.row_copies import issue_row_copies
from pallas_kernels.sparse_mla import kernel_fwd
from pallas_kernels.sparse_mla.kernel_fwd import HEAD_TILE

BLOCK_K = 64  # selected keys per block: the M of the dkv wgmma
SLAB = 64  # dkv columns per staging slot; a 128-column slab takes two slots' bytes
REDUCE_WARPS = 4  # warps of each compute warpgroup that issue its dkv reduce-adds

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
          ds_smem, idx_smem, q_bar, kv_ready, idx_ready, kv_free, ds_ready, *, chunks, steps, scale, interpret,
          slab_cols, n_tiles):
  p_smem, (lse_smem, dd_smem) = p_smem
  kv_parts = [tuple(parts) for parts in kv_smem]  # a RefUnion iterates over its views
  kv_smem, kv_flat, stage_smem, wide_smem = zip(*(parts + (None,) * (4 - len(parts)) for parts in kv_parts))
  b, t, tile = kernel_fwd.grid_position(n_tiles)
  h0 = tile * HEAD_TILE
  wg = lax.axis_index("wg")
  bk, half, dtype = BLOCK_K, chunks[0][1], q_ref.dtype
  heads = pl.ds(h0, HEAD_TILE)
  slot_of = lambda j: lax.rem(j, 2)  # idx_smem / idx_ready slot of block j

  def add_rows(slab, col, slot):
    """The reduce-adds of a staged slab [bk, width]: dkv[b, idx[r], col:col+width] += slab[r]."""
    def add_row(r, row):
      plgpu.copy_smem_to_gmem(slab.at[pl.ds(r, 1)], dkv_ref.at[b, pl.ds(row, 1), pl.ds(col, slab.shape[-1])],
                              commit_group=False, reduction_op="add")

    # From REDUCE_WARPS lanes; every thread then commits (and later awaits) its own bulk group.
    issue_row_copies(bk, REDUCE_WARPS, lambda r: idx_smem[slot, r], add_row)
    plgpu.commit_smem_to_gmem_group()

  def reduce_slab(acc, stage, j, slab, col):
    """dkv[b, idx[r], col:col+w] += acc[r] for the rows of block j (acc [bk, w]; slab counts from 0 per block).

    stage: (two [bk, 64] f32 slots, one [bk, 128] f32 view or None) of this warpgroup's key-block chunk."""
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
      plgpu.copy_smem_to_gmem(buf, dkv_ref.at[b, t, tile, pl.ds(j * bk, bk), pl.ds(col, acc.shape[1])])
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

  def dkv_slabs(j, cols, stage):
    """The dkv slabs `cols` ((column, width) pairs) of block j, staged in `stage` and reduce-added."""
    for i, (col, width) in enumerate(cols):
      reduce_slab(slab_product(col, width), stage, j, i, col)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

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
      p_smem[...] = pt.astype(dtype)
      ds_smem[...] = (pt * (dpt - dd) * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_arrive(ds_ready)
      dq = dq_product(dq, 0)
      dkv_slabs(j, cols, (stage_smem[0], wide_smem[0]))
      plgpu.barrier_arrive(kv_free.at[0])
      return dq

    dq = lax.fori_loop(0, steps, step, zeros(half))
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
      dq, dq_rope = dq_product(dq, 1), dq_product(dq_rope, 2)
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

    def await_release(j, part):
      """Block j - 1's release of the key block's part (0: chunk 0, wg 0's; 1: the rest, wg 1's)."""
      @pl.when(j > 0)
      def _():
        plgpu.barrier_wait(kv_free.at[part])

    def issue(idx_j, part):
      """Copies of the selected rows' chunks `part` into the key block: cp.async from all 128 threads (one
      commit group), or in interpret mode one TMA per row and chunk, arriving on kv_ready."""
      if not interpret:
        cp_async_gather.issue_block(kv_ref.at[b], idx_j, [kv_flat[c] for c in part],
                                    chunks=[chunks[c] for c in part], rows=bk)
        return

      def copy_row(r, row):
        for c in part:
          off, width = chunks[c]
          plgpu.copy_gmem_to_smem(kv_ref.at[b, pl.ds(row, 1), pl.ds(off, width)], kv_smem[c].at[pl.ds(r, 1)],
                                  kv_ready)

      issue_row_copies(bk, 1, lambda r: idx_j[r], copy_row)

    load_idx(0)

    @pl.loop(0, steps)
    def _block(j):
      await_release(j, 0)
      plgpu.barrier_wait(idx_ready.at[slot_of(j)])
      idx_j = idx_smem.at[slot_of(j)]
      issue(idx_j, [0])  # chunk 0 as soon as wg 0 has released it
      await_release(j, 1)  # the rest once wg 1 has, whose reduce-adds read block j - 1's indices until then

      @pl.when(j + 1 < steps)
      def _prefetch():  # block j + 1's indices, into the slot that block j - 1 used
        load_idx(j + 1)

      issue(idx_j, range(1, len(chunks)))
      if not interpret:  # all copies landed, fenced for the async proxy, then every thread arrives
        cp_async_gather.wait(0)
        plgpu.commit_smem()
        plgpu.barrier_arrive(kv_ready)

    for part in range(2):  # observe the last releases, so that every barrier phase is waited on
      plgpu.barrier_wait(kv_free.at[part])


def _kv_buffer(width: int, dtype, stage: bool, wide: bool, interpret: bool):
  """SMEM for one column chunk of the gathered key block: its wgmma view, its flat view (written by
  `cp_async_gather`; None in interpret mode) and, where `stage`, in the same bytes two [64, 64] f32 dkv staging
  slots and, where `wide`, one [64, 128] f32 staging view. Interpret mode models views logically, so there the
  views are separate buffers."""
  tiled = plgpu.SMEM((BLOCK_K, width), dtype, transforms=_TRANSFORMS)
  staging = (plgpu.SMEM((2, BLOCK_K, SLAB), jnp.float32),) if stage else ()
  staging += (plgpu.SMEM((BLOCK_K, 2 * SLAB), jnp.float32),) if stage and wide else ()
  if interpret:
    return (tiled, None, *staging)
  return plgpu.RefUnion(tiled, plgpu.SMEM((BLOCK_K * width,), dtype), *staging)


def _scratch(chunks, dtype, wide: bool, interpret: bool):
  smem = functools.partial(plgpu.SMEM, dtype=dtype, transforms=_TRANSFORMS)
  half = chunks[0][1]
  rows = (plgpu.SMEM((HEAD_TILE,), jnp.float32), plgpu.SMEM((HEAD_TILE,), jnp.float32))
  return (
      tuple(smem((HEAD_TILE, w)) for _, w in chunks),
      (smem((HEAD_TILE, half)), smem((HEAD_TILE, half))),
      tuple(_kv_buffer(w, dtype, c < 2, wide, interpret) for c, (_, w) in enumerate(chunks)),
      # The lse and (delta - dlse) rows are read into registers before P^T is first written.
      (plgpu.RefUnion if not interpret else lambda *refs: refs)(smem((BLOCK_K, HEAD_TILE)), rows),
      smem((BLOCK_K, HEAD_TILE)),
      plgpu.SMEM((2, BLOCK_K), jnp.int32),  # two slots: block j + 1's indices land while block j is reduced
      plgpu.Barrier(num_arrivals=len(chunks) + 4),
      # kv_ready: one TMA arrival per row and chunk (interpret mode), or one per thread after the cp.async wait
      plgpu.Barrier(num_arrivals=len(chunks) * BLOCK_K if interpret else 1),
      plgpu.Barrier(num_barriers=2),  # idx_ready, per slot
      plgpu.Barrier(num_barriers=2),  # kv_free: [0] chunk 0 released by wg 0, [1] the rest by wg 1
      plgpu.Barrier(),  # ds_ready: P^T and dS^T written
  )


def sparse_mla_bwd(q, kv, indices, out, lse, do, dlse, *, scale: float, v_dim: int,
                   interpret=False) -> tuple[jax.Array, jax.Array]:
  """Gradients of `reference.sparse_mla` w.r.t. q [B, T, N, Dk] and kv [B, S, Dk] from the saved lse,
  given the cotangents of out (`do`, [B, T, N, v_dim]) and of lse (`dlse`, [B, T, N]).

  `interpret`: GPU interpret mode (`plgpu.InterpretGPUParams`), which gathers rows by TMA instead of cp.async and
  sums per-token partials in XLA instead of the reduce-adds."""
  bsz, t, n, dk = q.shape
  chunks = kernel_fwd.column_chunks(dk, v_dim)
  wide = chunks[0][1] >= 2 * SLAB  # 128-column slabs where the value chunks are that wide
  n_tiles = -(-n // HEAD_TILE)
  emulated = interpreting(interpret)
  dtype = q.dtype
  delta = jnp.einsum("btnd,btnd->btn", out.astype(jnp.float32), do.astype(jnp.float32))
  lse2 = jnp.where(jnp.isfinite(lse), lse, 0.0) * math.log2(math.e)
  n_pad = -n % HEAD_TILE
  pad_heads = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, n_pad)] + [(0, 0)] * (x.ndim - 3))
  q, do = pad_heads(q), pad_heads(do.astype(dtype))
  lse2, dd = pad_heads(lse2), pad_heads(delta - dlse.astype(jnp.float32))
  k_pad = -indices.shape[-1] % BLOCK_K
  indices = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad)), constant_values=-1)
  body = functools.partial(_body, chunks=chunks, steps=indices.shape[-1] // BLOCK_K, scale=scale,
                           interpret=emulated, slab_cols=2 * SLAB if wide else SLAB, n_tiles=n_tiles)
  grid, grid_names = kernel_fwd.token_grid(n_tiles, bsz, t)
  kernel = plgpu.kernel(
      body,
      out_type=(),
      scratch_types=_scratch(chunks, dtype, wide, emulated),
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
  dkv_shape = (bsz, t, n_tiles, *indices.shape[2:], dk) if emulated else kv.shape
  dq, dkv = pl.run_state(run)((jnp.zeros(q.shape, dtype), jnp.zeros(dkv_shape, jnp.float32)))
  if emulated:
    rows = jnp.where(indices >= 0, indices, 0)
    dkv = jax.vmap(lambda r, g: jnp.zeros(kv.shape[1:], jnp.float32).at[r].add(g))(rows, dkv.sum(2))
  return dq[:, :, :n], dkv.astype(kv.dtype)
