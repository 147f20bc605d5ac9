"""Sparse MLA forward on Hopper with Pallas Mosaic GPU: gathered latent rows, wgmma, online softmax.

DeepSeek-V3.2 DSA in MQA mode (arXiv 2512.02556, section 2.1; FlashMLA's sparse prefill kernel is the official
counterpart): every query token attends, with all of its heads, to its own K selected 576-dim latent entries
[c (512) | k_rope (64)]; the value of an entry is its latent c. Same function as `reference.sparse_mla`.

One CTA owns one token and a tile of 64 heads (the wgmma M of one warpgroup). The head tiles of a token are
launched side by side (`token_grid`), so that the second one finds the gathered rows in L2. Three warpgroups:
  * wg 2 (memory): per block of `block_k` selected keys, copies the index block into SMEM, then gathers the
    selected rows. Hopper has no TMA gather, and a TMA copy lands a single row in the swizzled wgmma layout
    only as 128-byte lines (9 copies per 576-wide row, too many for the few threads that can issue them), so
    all 128 threads copy 16-byte pieces to their swizzled places with cp.async (`mosaic.cp_async_gather`).
    Block j + 1 is published as soon as its copies land, while block j is consumed. GPU interpret mode cannot
    run that inline code: there the rows come by one TMA copy per row and column chunk.
  * wg 0: S = Q K^T over the three column chunks, masking of invalid (-1) keys, online softmax (base 2); hands
    P and the rescale factor to wg 1 through SMEM, then O[:, :256] += P V[:, :256].
  * wg 1: O[:, 256:] += P V[:, 256:]. Splitting the value columns keeps each 64 x 256 f32 accumulator within
    one warpgroup's registers.
The Q tile's SMEM stages the output, and the row buffer (alpha, then 1/l) the logsumexp: the kernel fits
Hopper's 227 KiB of SMEM per block with 64-key blocks double-buffered. Pallas's automatic warpgroup barriers are
off: no thread both reads and writes one SMEM region with ordinary accesses, and every copy would pay one.

Decoding (`mla_decode`) runs this kernel too: the batch's query rows as tokens over the cache's page pool, whose
latent and rope parts are separate arrays (`kv_rope=`), each row's keys split into parts (`splits=`, split-K).

FP8 variant (`kv_scale=`, the FP8 decode cache, which `mla_decode` runs through it): the gather warpgroup copies
e4m3 latent rows (half the bytes) into a staging buffer and the rows' per-tile scales transposed to [tiles, block_k];
each compute warpgroup dequantises the tiles of its value half (e4m3 x scale in float32, rounded to bf16) into one
bf16 buffer per half, wg 1 signals wg 0 (`deq_ready`) before QK^T, and the staged block is released after QK^T.
Q's rope chunk comes by TMA through the P buffer (free until the first P) into wg 0's registers as wgmma's A
operand, so the rope part must be block_k wide: 225360 bytes of SMEM at V3.2 shapes (the SMEM Q buffer would put it
1104 bytes over). Checked on CPU only (interpret mode, cross-lowering); never run on a GPU, so wg 0's 16 more
registers against ptxas's 232 are unchecked. GPU interpret mode hangs on a 2-core CPU unless XLA's concurrency-
optimised CPU scheduler is off (tests/pallas_kernels/test_mla_decode.py, `FP8KernelTest`).

Limits: bf16; v_dim a multiple of 128 up to 512 and a rope part of 64 to 256 columns (`supports`). There is no
room for a second gather warpgroup: ptxas caps 512 threads at 128 registers each, and wg 0 and wg 1 need more.
Today: 460-530 TFLOP/s over 8K-128K keys at V3.2 shapes on an H200 (benchmarks/sparse_mla.md).
"""

import dataclasses
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

HEAD_TILE = 64
# setmaxnreg of each compute warpgroup and of the gather warpgroup (multiples of 8): the three warpgroups
# together must fit the SM's 65536 registers, (2 * 232 + 40) * 128.
COMPUTE_REGISTERS, GATHER_REGISTERS = 232, 40
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
FP8_TILE = 128  # latent values per float32 scale in the FP8 decode cache
_FP8_TRANSFORMS = (plgpu.TilingTransform((8, FP8_TILE)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class Config:
  block_k: int = 64  # selected keys per pipeline step
  stages: int = 2  # key blocks in flight (SMEM holds `stages` gathered blocks)

  def __post_init__(self):
    if self.block_k % 64 or not 64 <= self.block_k <= 256:
      raise ValueError(f"block_k={self.block_k} must be a multiple of 64 in [64, 256].")
    if self.stages < 1:
      raise ValueError(f"stages={self.stages} must be >= 1.")


def supports(dk: int, v_dim: int, dtype, fp8_cache: bool = False) -> bool:
  """Whether the kernel handles these entry widths and dtype (the API's automatic choice asks this).
  `fp8_cache` (kv_scale given): each compute warpgroup dequantises whole FP8 tiles of its value half, so v_dim must
  be a multiple of 2 * FP8_TILE, and Q's rope chunk passes through the P buffer, so the rope part must be as wide as
  a key block (the default Config's)."""
  half, rope = v_dim // 2, dk - v_dim
  return (jnp.dtype(dtype) == jnp.bfloat16 and not v_dim % 128 and half <= 256 and not rope % 64 and 0 < rope <= 256
          and not (fp8_cache and (half % FP8_TILE or rope != Config().block_k)))


def column_chunks(dk: int, v_dim: int) -> tuple[tuple[int, int], ...]:
  """(offset, width) of the three key chunks: two halves of the value columns, then the rope part."""
  half, rope = v_dim // 2, dk - v_dim
  if not supports(dk, v_dim, jnp.bfloat16):
    raise ValueError(f"Unsupported dims dk={dk}, v_dim={v_dim}: need v_dim a multiple of 128 and <= 512, "
                     "and dk - v_dim a multiple of 64 in (0, 256].")
  return (0, half), (half, half), (v_dim, rope)


def _body(q_ref, kv_refs, idx_ref, out_ref, lse_ref, q_smem, kv_smem, p_smem, idx_smem, row_smem,
          q_bar, kv_ready, idx_ready, kv_free, p_ready, p_free, fp8_smem=(), *, chunks, sources, steps, scale, cfg,
          n_tiles, splits, interpret):
  kv_smem, kv_flat = zip(*kv_smem)
  fp8 = bool(fp8_smem)
  # What the gather warpgroup copies per key: (tiled buffer, flat view, source part, source column, width).
  if fp8:  # the FP8 latent into its staging buffer, the rope part into its key chunk; the scales (below)
    (staging, staging_flat), scale_smem, deq_ready = fp8_smem
    gathered = ((staging, staging_flat, 0, 0, 2 * chunks[0][1]), (kv_smem[2], kv_flat[2], 1, 0, chunks[2][1]))
  else:
    gathered = tuple((smem, flat, part, col, w) for smem, flat, (part, col), (_, w) in
                     zip(kv_smem, kv_flat, sources, chunks))
  b, t, tile = grid_position(n_tiles)
  tq = t // splits if splits > 1 else t  # the query row of this row of indices
  h0 = tile * HEAD_TILE
  wg = lax.axis_index("wg")
  bk, half = cfg.block_k, chunks[0][1]
  dtype = q_ref.dtype
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def slot_of(j):
    return lax.rem(j, jnp.int32(cfg.stages))

  def key_chunk(i, slot):
    """Key chunk i of block `slot` as wgmma reads it (FP8 cache: the value halves are dequantised, one buffer)."""
    return kv_smem[i] if fp8 and i < 2 else kv_smem[i].at[slot]

  def dequantise(h, slot):
    """FP8 cache: value half h of block `slot`, tile by tile: e4m3 x its key's scale (float32), rounded to bf16,
    into the half's buffer; fenced for wgmma."""
    for t in range(half // FP8_TILE):
      tile = h * half // FP8_TILE + t
      x = plgpu.load(staging.at[slot, :, pl.ds(tile * FP8_TILE, FP8_TILE)], (), layout=plgpu.Layout.WGMMA_8BIT)
      s = plgpu.load(scale_smem.at[slot, tile], (), layout=plgpu.Layout.WGMMA_8BIT.reduce(1))
      x = x.astype(jnp.float32) * lax.broadcast_in_dim(s, x.shape, [0])
      kv_smem[h][:, pl.ds(t * FP8_TILE, FP8_TILE)] = x.astype(dtype)
    plgpu.commit_smem()

  def pv(acc, alpha, v_smem):
    """acc * alpha + P V with P from SMEM. GPU interpret mode has no `run_state` over accumulators yet,
    so there the block product gets a fresh accumulator and is added in registers."""
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    if interpret:
      def block(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_smem)
        return acc_ref[...]
      return acc + pl.run_scoped(block, plgpu.ACC(acc.shape, jnp.float32))
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p_smem, v_smem))(plgpu.ACC.init(acc))

  def zeros_acc():
    return plgpu.layout_cast(jnp.zeros((HEAD_TILE, half), jnp.float32), plgpu.Layout.WGMMA)

  def store_out(acc, inv_l, col):
    smem = q_smem[col]
    smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, out_ref.at[b, t, pl.ds(h0, HEAD_TILE), pl.ds(col * half, half)])

  @pl.when(wg == 0)
  def _scores_and_left_half():
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
    # FP8: Q's rope chunk comes through the P buffer (free until the first P) into registers, wgmma's A operand.
    # GPU interpret mode's wgmma takes refs only: there the rope chunk goes from registers into a third Q buffer.
    q_chunks = (*q_smem[:2], p_smem) if fp8 else q_smem
    for (off, width), smem in zip(chunks, q_chunks):
      plgpu.copy_gmem_to_smem(q_ref.at[b, tq, pl.ds(h0, HEAD_TILE), pl.ds(off, width)], smem, q_bar)
    plgpu.barrier_wait(q_bar)
    if fp8:
      q_chunks = (*q_smem[:2], plgpu.load(p_smem, (), layout=plgpu.Layout.WGMMA))
      if interpret:
        q_smem[2][...] = q_chunks[2]
        q_chunks = q_smem
      plgpu.commit_smem()  # (its warpgroup barrier) every thread has read the rope chunk before P overwrites it
    log2_scale = scale * math.log2(math.e)

    def qk(slot):
      def scores(s_ref):
        for i, q_chunk in enumerate(q_chunks):
          plgpu.wgmma(s_ref, q_chunk, key_chunk(i, slot).transpose((1, 0)))
        return s_ref[...]
      return pl.run_scoped(scores, plgpu.ACC((HEAD_TILE, bk), jnp.float32))

    def load_idx(slot):
      return plgpu.load(idx_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))

    def softmax_and_pv(j, slot, s, idx, acc, m, l):
      """Online softmax of block j's scores s, P to wg 1, then O[:, :256] += P V; releases the block (bf16; the FP8
      variant released it after QK^T). idx: the block's indices, or None to load them here."""
      idx = load_idx(slot) if idx is None else idx
      bias = jnp.where(idx >= 0, 0.0, -jnp.inf).astype(jnp.float32)
      s = s * log2_scale + lax.broadcast_in_dim(bias, s.shape, [1])
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)

      @pl.when(j > 0)
      def _():
        plgpu.barrier_wait(p_free)

      p_smem[...] = p.astype(dtype)
      row_smem[...] = alpha
      plgpu.commit_smem()
      plgpu.barrier_arrive(p_ready)
      acc = pv(acc, alpha, key_chunk(0, slot))
      if not fp8:
        plgpu.barrier_arrive(kv_free.at[slot])
      return acc, m_new, l

    def step(j, carry):
      slot = slot_of(j)
      plgpu.barrier_wait(idx_ready.at[slot])
      plgpu.barrier_wait(kv_ready.at[slot])
      if not fp8:
        return softmax_and_pv(j, slot, qk(slot), None, *carry)
      # FP8: dequantise the left half, wait for wg 1's right half, QK^T, then the staged block (and its indices)
      # can be refilled. The indices are read first: read after QK^T, interpret mode's race detector reports that
      # read against the gather's refill of the slot although kv_free orders them (not understood).
      idx = load_idx(slot)
      dequantise(0, slot)
      plgpu.barrier_wait(deq_ready)
      s = qk(slot)
      plgpu.barrier_arrive(kv_free.at[slot])
      return softmax_and_pv(j, slot, s, idx, *carry)

    # A finite floor keeps alpha finite while every key seen so far is invalid.
    m0 = plgpu.layout_cast(jnp.full((HEAD_TILE,), -1e30, jnp.float32), row_layout)
    l0 = plgpu.layout_cast(jnp.zeros((HEAD_TILE,), jnp.float32), row_layout)
    acc, m, l = lax.fori_loop(0, steps, step, (zeros_acc(), m0, l0))
    empty = l == 0.0
    inv_l = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    plgpu.barrier_wait(p_free)  # wg 1's release of the last block's P
    row_smem[...] = inv_l
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_ready)
    store_out(acc, inv_l, 0)
    plgpu.barrier_wait(p_free)  # wg 1 has read 1/l: the row buffer now stages the lse.
    row_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * math.log(2.0))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(row_smem, lse_ref.at[b, t, pl.ds(h0, HEAD_TILE)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _right_half():
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

    def step(j, acc):
      slot = slot_of(j)
      plgpu.barrier_wait(kv_ready.at[slot])
      if fp8:  # the right half's dequantised values for wg 0's QK^T and this PV (wg 0 has finished reading the
        # previous block's: it computed those scores before the P that this warpgroup waited for)
        dequantise(1, slot)
        plgpu.barrier_arrive(kv_free.at[slot])
        plgpu.barrier_arrive(deq_ready)
      plgpu.barrier_wait(p_ready)
      alpha = plgpu.load(row_smem, layout=row_layout)
      acc = pv(acc, alpha, key_chunk(1, slot))
      plgpu.barrier_arrive(p_free)
      if not fp8:
        plgpu.barrier_arrive(kv_free.at[slot])
      return acc

    acc = lax.fori_loop(0, steps, step, zeros_acc())
    plgpu.barrier_wait(p_ready)
    inv_l = plgpu.load(row_smem, layout=row_layout)
    plgpu.barrier_arrive(p_free)
    store_out(acc, inv_l, 1)
    plgpu.wait_smem_to_gmem(0)

  def load_indices(j):
    """Block j's indices into their SMEM slot; -> the slot."""
    slot = slot_of(j)
    plgpu.copy_gmem_to_smem(idx_ref.at[b, t, pl.ds(j * bk, bk)], idx_smem.at[slot], idx_ready.at[slot])
    plgpu.barrier_wait(idx_ready.at[slot])
    return slot

  def cp_async_gather_loop():
    """Block j's copies are issued up to `stages` blocks ahead; once they have landed (all but the newer groups
    waited for, then a proxy fence) every thread arrives on kv_ready (count 1 per thread)."""
    def fetch(j):
      slot = load_indices(j)
      flat = [view.at[pl.ds(slot * bk * w, bk * w)] for _, view, _, _, w in gathered]
      cp_async_gather.issue_block([kv_refs[part].at[b] for _, _, part, _, _ in gathered], idx_smem.at[slot], flat,
                                  chunks=[(col, w) for *_, col, w in gathered], rows=bk,
                                  scales=(kv_refs[2].at[b], scale_smem.at[slot]) if fp8 else None)

    def publish(j, pending):
      cp_async_gather.wait(pending)
      plgpu.commit_smem()
      plgpu.barrier_arrive(kv_ready.at[slot_of(j)])

    # Block j + 1 is published before block j's release is awaited, as soon as its copies have landed.
    issued = min(cfg.stages, steps)
    for j in range(issued):
      fetch(jnp.int32(j))
    publish(jnp.int32(0), issued - 1)

    @pl.loop(0, max(steps - cfg.stages, 0))
    def _steady(j):
      publish(j + 1, cfg.stages - 2)
      plgpu.barrier_wait(kv_free.at[slot_of(j)])
      fetch(j + cfg.stages)

    for j in range(max(steps - cfg.stages, 0), steps - 1):
      publish(jnp.int32(j + 1), steps - 2 - j)

  def tma_gather_loop():
    """Interpret mode: one TMA copy per selected row and column chunk, all arriving on the slot's kv_ready."""
    def fetch(j):
      slot = load_indices(j)

      def copy_row(r, row):
        for smem, _, part, col, width in gathered:
          plgpu.copy_gmem_to_smem(kv_refs[part].at[b, pl.ds(row, 1), pl.ds(col, width)],
                                  smem.at[slot, pl.ds(r, 1)], kv_ready.at[slot])
        if fp8:  # the row's scales [G, 1] (kv_refs[2] is [B, S, G, 1] here) into column r of [G, block_k]
          plgpu.copy_gmem_to_smem(kv_refs[2].at[b, row], scale_smem.at[slot, :, pl.ds(r, 1)], kv_ready.at[slot])

      issue_row_copies(bk, 1, lambda r: idx_smem[slot, r], copy_row)

    for j in range(min(cfg.stages, steps)):
      fetch(jnp.int32(j))

    @pl.loop(cfg.stages, steps)
    def _refill(j):
      plgpu.barrier_wait(kv_free.at[slot_of(j)])
      fetch(j)

  @pl.when(wg == 2)
  def _gather():
    plgpu.set_max_registers(GATHER_REGISTERS, action="decrease")
    if interpret:
      tma_gather_loop()
    else:
      cp_async_gather_loop()
    # Observe the last releases too, so that every barrier phase has been waited on at exit.
    for j in range(max(steps - cfg.stages, 0), steps):
      plgpu.barrier_wait(kv_free.at[j % cfg.stages])


def token_grid(n_tiles: int, bsz: int, t: int):
  """(grid, grid_names) of the sparse MLA kernels: one CTA per (batch, token, head tile), the head tiles of a
  token adjacent (so that they run at the same time and share the gathered rows in L2).

  Mosaic GPU launches the grid reversed (last axis -> CUDA x), and CUDA caps y and z at 65535 blocks, so the
  (token, head tile) pairs go on x."""
  return (bsz, t * n_tiles), ("b", "th")


def grid_position(n_tiles: int):
  """Kernel code: (batch, token, head tile) of this CTA in the grid of `token_grid`."""
  th = lax.axis_index("th")
  return lax.axis_index("b"), th // n_tiles, lax.rem(th, n_tiles)


def _kv_buffer(stages: int, bk: int, width: int, dtype, interpret: bool, transforms=_TRANSFORMS):
  """SMEM for one column chunk of the gathered keys: (wgmma view, flat view written by `cp_async_gather`).

  The flat view aliases the tiled, swizzled bytes that wgmma reads; `cp_async_gather` writes each piece at its
  swizzled address. Interpret mode copies rows into the tiled view itself (no flat view)."""
  tiled = plgpu.SMEM((stages, bk, width), dtype, transforms=transforms)
  if interpret:
    return tiled, None
  return plgpu.RefUnion(tiled, plgpu.SMEM((stages * bk * width,), dtype))


def sparse_mla_fwd(q: jax.Array, kv: jax.Array, indices: jax.Array, *, scale: float, v_dim: int,
                   config: Config = Config(), interpret=False, kv_rope: jax.Array | None = None,
                   splits: int = 1, kv_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Dk], kv [B, S, Dk], indices [B, T, K] (-1 = skip) -> (out [B, T, N, v_dim], lse [B, T, N]).

  `interpret`: GPU interpret mode (`plgpu.InterpretGPUParams`), which gathers rows by TMA instead of cp.async.
  `kv_rope` [B, S, Dk - v_dim]: the rope columns kept in their own array (the decode cache's layout); kv then
  holds the first v_dim columns only. `splits` (split-K, `mla_decode`): indices has T * splits rows, row r
  attending for query r // splits, and out and lse have T * splits rows (one partial result per row of indices).
  `kv_scale` [B, S, v_dim / FP8_TILE] float32 (the FP8 decode cache, with kv_rope): kv is float8_e4m3fn and its
  dequantised value kv * the scale of its tile (module docstring: the FP8 variant).
  """
  bsz, t, n, dk = q.shape
  chunks = column_chunks(dk, v_dim)
  parts = (kv,) if kv_rope is None else (kv, kv_rope)
  widths = tuple(x.shape[-1] for x in parts)
  if widths not in ((dk,), (v_dim, dk - v_dim)) or indices.shape[:2] != (bsz, t * splits):
    raise ValueError(f"kernel_fwd.sparse_mla_fwd: kv parts of widths {widths} and indices {indices.shape} do not "
                     f"fit q {q.shape}, v_dim={v_dim}, splits={splits}: need widths ({dk},) or ({v_dim}, "
                     f"{dk - v_dim}) and indices [{bsz}, {t * splits}, K].")
  fp8 = kv_scale is not None
  if fp8 and (kv_rope is None or kv.dtype != jnp.float8_e4m3fn or kv_scale.shape != (*kv.shape[:2], v_dim // FP8_TILE)
              or not supports(dk, v_dim, q.dtype, fp8_cache=True) or dk - v_dim != config.block_k):
    raise ValueError(f"kernel_fwd.sparse_mla_fwd: kv {kv.dtype}{kv.shape} with kv_scale {kv_scale.shape} and kv_rope "
                     f"{None if kv_rope is None else kv_rope.shape}: the FP8 variant needs kv float8_e4m3fn, kv_rope, "
                     f"kv_scale [{kv.shape[0]}, {kv.shape[1]}, {v_dim // FP8_TILE}] and v_dim a multiple of "
                     f"{2 * FP8_TILE} and a rope part of block_k = {config.block_k} columns.")
  # (part, column in the part) where each column chunk starts
  sources = tuple((0, off) if len(parts) == 1 or off < v_dim else (1, off - v_dim) for off, _ in chunks)
  n_pad = -n % HEAD_TILE
  q = jnp.pad(q, ((0, 0), (0, 0), (0, n_pad), (0, 0)))
  k_pad = -indices.shape[-1] % config.block_k
  indices = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad)), constant_values=-1)
  steps = indices.shape[-1] // config.block_k
  bk, stages, dtype = config.block_k, config.stages, q.dtype
  smem = functools.partial(plgpu.SMEM, dtype=dtype, transforms=_TRANSFORMS)
  n_tiles = (n + n_pad) // HEAD_TILE
  emulated = interpreting(interpret)
  body = functools.partial(_body, chunks=chunks, sources=sources, steps=steps, scale=scale, cfg=config,
                           n_tiles=n_tiles, splits=splits, interpret=emulated)
  if fp8:
    # value halves dequantised into one buffer each; the FP8 latent staged per block, its scales [G, block_k]
    # (interpret mode copies a row's [G, 1] scales into their column, so kv_scale goes in as [B, S, G, 1])
    kv_buffers = (*((smem((bk, w)), None) for _, w in chunks[:2]),
                  _kv_buffer(stages, bk, chunks[2][1], dtype, emulated))
    fp8_scratch = (_kv_buffer(stages, bk, v_dim, kv.dtype, emulated, transforms=_FP8_TRANSFORMS),
                   plgpu.SMEM((stages, v_dim // FP8_TILE, bk), jnp.float32), plgpu.Barrier())
    parts = (kv, kv_rope.astype(dtype), kv_scale.astype(jnp.float32)[..., None] if emulated else kv_scale)
  else:
    kv_buffers = tuple(_kv_buffer(stages, bk, w, dtype, emulated) for _, w in chunks)
    fp8_scratch = ()
    parts = tuple(x.astype(dtype) for x in parts)
  grid, grid_names = token_grid(n_tiles, bsz, t * splits)

  def sparse_mla_fwd_kernel(q_ref, idx_ref, *refs):
    body(q_ref, refs[:len(parts)], idx_ref, *refs[len(parts):])

  out, lse = plgpu.kernel(
      sparse_mla_fwd_kernel,
      out_type=(jax.ShapeDtypeStruct((bsz, t * splits, n + n_pad, v_dim), dtype),
                jax.ShapeDtypeStruct((bsz, t * splits, n + n_pad), jnp.float32)),
      scratch_types=(
          tuple(smem((HEAD_TILE, w)) for _, w in (chunks[:2] if fp8 and not emulated else chunks)),
          kv_buffers,
          smem((HEAD_TILE, bk)),
          plgpu.SMEM((stages, bk), jnp.int32),
          plgpu.SMEM((HEAD_TILE,), jnp.float32),
          plgpu.Barrier(num_arrivals=len(chunks)),
          # kv_ready: one TMA arrival per row and chunk (interpret mode; FP8: latent, rope and scales, also 3), or one
          # per thread after the cp.async wait
          plgpu.Barrier(num_arrivals=len(chunks) * bk if emulated else 1, num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(),
          plgpu.Barrier(),
          *((fp8_scratch,) if fp8 else ()),
      ),
      grid=grid,
      grid_names=grid_names,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                                          unsafe_no_auto_barriers=True),
      interpret=interpret,
  )(q, indices, *parts)
  return out[:, :, :n], lse[:, :, :n]
