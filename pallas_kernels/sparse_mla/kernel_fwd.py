"""Sparse MLA forward on Hopper with Pallas Mosaic GPU: gathered latent rows, wgmma, online softmax.

DeepSeek-V3.2 DSA in MQA mode (arXiv 2512.02556, section 2.1; FlashMLA's sparse prefill kernel is the
official counterpart): every query token attends, with all of its heads, to its own K selected 576-dim
latent entries [c (512) | k_rope (64)]; the value of an entry is its latent c. Same function as
`reference.sparse_mla`.

One CTA owns one token and a tile of 64 heads (the wgmma M of one warpgroup); a token's head tiles are launched
side by side (`Config.adjacent_tiles`), so that the second finds the gathered rows in L2. Three warpgroups:
  * wg 2 (memory): per block of `block_k` selected keys, copies the index block into SMEM, then gathers
    the selected rows (Hopper has no TMA gather). By default (`Config.gather="cp_async"`,
    `cp_async_gather`) all 128 threads copy 16-byte pieces to their swizzled places, and block j + 1's
    copies fly while block j is consumed. The first version ("tma") issued one TMA per row and 64-column
    line (the 128-byte swizzle lands single rows only as 128-byte lines: 9 copies per 576-wide row, all
    completing on one barrier per pipeline slot) from one thread, and at 576 copies per 64-key block
    that issue rate, not the wgmma work, bounded the kernel. A second gather warpgroup does not compile
    on the H200: ptxas caps four warpgroups (512 threads) at 65536 / 512 = 128 registers per thread,
    whatever setmaxnreg asks at run time, and wg 0 and wg 1 need more than 154. `Config.gather_warps`
    splits the TMA path's rows among up to four warps of wg 2 (`plgpu.warp_map`).
    Measured on the H200 (`experiments/bench_sections/sparse_mla_gather.py`, 4096 queries, 128 heads,
    k = 2048, 2026-11-29): TMA from 1 warp 18.9-19.4 ms (120 TFLOP/s), from 2 warps 16.4 ms, from 4 warps
    9.2-9.7 ms (240-254 TFLOP/s); cp.async 4.65 ms (502 TFLOP/s) over 8K keys, 5.07 ms (460 TFLOP/s) over
    128K keys; identical outputs. Without its math the kernel takes 3.4 / 4.6 ms, without its copies
    4.1 / 4.2 ms (`Config.skip`): the gather and the two compute warpgroups are now about even.
  * wg 0: S = Q K^T over the three chunks, masking of invalid (-1) keys, online softmax (base 2), hands
    P and the rescale factor to wg 1 through SMEM, then O[:, :256] += P V[:, :256].
  * wg 1: O[:, 256:] += P V[:, 256:]. Splitting the value columns keeps each 64 x 256 f32 accumulator
    within one warpgroup's registers.
The Q tile's SMEM stages the output, and the row buffer (alpha, then 1/l) the logsumexp: the whole
kernel fits Hopper's 227 KiB of SMEM per block with 64-key blocks double-buffered.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import cp_async_gather
from pallas_kernels.mosaic.row_copies import issue_row_copies

HEAD_TILE = 64
# setmaxnreg of each compute warpgroup and of the gather warpgroup (multiples of 8): the three warpgroups
# together must fit the SM's 65536 registers, (2 * 232 + 40) * 128.
COMPUTE_REGISTERS, GATHER_REGISTERS = 232, 40
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
GATHERS = ("tma", "cp_async")


@dataclasses.dataclass(frozen=True)
class Config:
  block_k: int = 64
  stages: int = 2
  # Pallas's automatic warpgroup barriers around SMEM accesses and before every async copy. Off is safe
  # here (no thread both reads and writes one SMEM region with ordinary accesses) and made the forward
  # 2.5x faster on an H200 (48 -> 121 TFLOP/s, identical error): the 576 row copies per key block each
  # paid a warpgroup barrier.
  auto_barriers: bool = False
  # Warps of wg 2 that issue the row copies: 4 gives each warp a quarter of every key block's rows, each
  # issuing from its own elected lane (`plgpu.warp_map`), without the registers a second warpgroup costs.
  # 4 was 2.08x faster than 1 on the H200 (module docstring).
  gather_warps: int = 4
  # How rows are gathered: "cp_async" (16-byte cp.async copies by all 128 threads of the gather warpgroup,
  # `cp_async_gather`; 2.0x faster than "tma" with 4 warps on the H200; GPU only: interpret mode cannot
  # run it) or "tma" (per-row TMA copies, issued by `gather_warps` lanes).
  gather: str = "cp_async"
  # Launch order of the (token, head tile) CTAs: True (the head tiles of a token adjacent, so that they run at
  # the same time and the second one finds the gathered key rows, and in the backward the dkv rows it adds to,
  # in L2; `token_grid`) or False (tokens fastest, each head tile a pass over all tokens). On the H200 (4096
  # queries, 128 heads, K = 2048, session 7 of 2026-11-29) True took the forward over 128K keys from 5.03 to
  # 4.65 ms (465 -> 502 TFLOP/s) and the backward from 42.2 to 34.7 ms over 128K keys, 38.1 to 32.8 over 32K.
  adjacent_tiles: bool = True
  # Benchmark diagnostics only, the output is then meaningless: "copies" leaves out the cp.async row copies
  # (the pipeline and barriers stay), "math" the two compute warpgroups' work; either time bounds the other.
  skip: str = ""

  def __post_init__(self):
    if self.block_k % 64 or not 64 <= self.block_k <= 256:
      raise ValueError(f"block_k={self.block_k} must be a multiple of 64 in [64, 256].")
    if self.stages < 1:
      raise ValueError(f"stages={self.stages} must be >= 1.")
    if self.gather_warps not in (1, 2, 4):
      raise ValueError(f"gather_warps={self.gather_warps} must be one of (1, 2, 4).")
    if self.gather not in GATHERS:
      raise ValueError(f"gather={self.gather!r} must be one of {GATHERS}.")
    if self.skip not in ("", "copies", "math") or (self.skip == "copies" and self.gather != "cp_async"):
      raise ValueError(f"skip={self.skip!r} must be '', 'math' or (with gather='cp_async') 'copies'.")



def supports(dk: int, v_dim: int, dtype) -> bool:
  """Whether the kernel handles these entry widths and dtype (the API's automatic choice asks this)."""
  half, rope = v_dim // 2, dk - v_dim
  return jnp.dtype(dtype) == jnp.bfloat16 and not v_dim % 128 and half <= 256 and not rope % 64 and 0 < rope <= 256


def column_chunks(dk: int, v_dim: int) -> tuple[tuple[int, int], ...]:
  """(offset, width) of the three key chunks: two halves of the value columns, then the rope part."""
  half, rope = v_dim // 2, dk - v_dim
  if not supports(dk, v_dim, jnp.bfloat16):
    raise ValueError(f"Unsupported dims dk={dk}, v_dim={v_dim}: need v_dim a multiple of 128 and <= 512, "
                     "and dk - v_dim a multiple of 64 in (0, 256].")
  return (0, half), (half, half), (v_dim, rope)


def _body(q_ref, kv_ref, idx_ref, out_ref, lse_ref, q_smem, kv_smem, p_smem, idx_smem, row_smem,
          q_bar, kv_ready, idx_ready, kv_free, p_ready, p_free, *, chunks, steps, scale, cfg, n_tiles,
          interpret):
  kv_smem, kv_lines = zip(*kv_smem)
  b, t, tile = grid_position(n_tiles, cfg.adjacent_tiles)
  h0 = tile * HEAD_TILE
  wg = lax.axis_index("wg")
  bk, half = cfg.block_k, chunks[0][1]
  dtype = q_ref.dtype
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def slot_of(j):
    return lax.rem(j, jnp.int32(cfg.stages))

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
    for (off, width), smem in zip(chunks, q_smem):
      plgpu.copy_gmem_to_smem(q_ref.at[b, t, pl.ds(h0, HEAD_TILE), pl.ds(off, width)], smem, q_bar)
    plgpu.barrier_wait(q_bar)
    log2_scale = scale * math.log2(math.e)

    def qk(slot):
      def scores(s_ref):
        for q_chunk, k_chunk in zip(q_smem, kv_smem):
          plgpu.wgmma(s_ref, q_chunk, k_chunk.at[slot].transpose((1, 0)))
        return s_ref[...]
      return pl.run_scoped(scores, plgpu.ACC((HEAD_TILE, bk), jnp.float32))

    def softmax_and_pv(j, slot, s, acc, m, l):
      """Online softmax of block j's scores s, P to wg 1, then O[:, :256] += P V; releases the block."""
      idx = plgpu.load(idx_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
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
      acc = pv(acc, alpha, kv_smem[0].at[slot])
      plgpu.barrier_arrive(kv_free.at[slot])
      return acc, m_new, l

    def step(j, carry):
      acc, m, l = carry
      slot = slot_of(j)
      plgpu.barrier_wait(idx_ready.at[slot])
      plgpu.barrier_wait(kv_ready.at[slot])
      if cfg.skip == "math":
        plgpu.barrier_arrive(kv_free.at[slot])
        return carry
      return softmax_and_pv(j, slot, qk(slot), acc, m, l)

    # A finite floor keeps alpha finite while every key seen so far is invalid.
    m0 = plgpu.layout_cast(jnp.full((HEAD_TILE,), -1e30, jnp.float32), row_layout)
    l0 = plgpu.layout_cast(jnp.zeros((HEAD_TILE,), jnp.float32), row_layout)
    acc, m, l = lax.fori_loop(0, steps, step, (zeros_acc(), m0, l0))
    empty = l == 0.0
    inv_l = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    if cfg.skip != "math":  # wg 1's release of the last block's P
      plgpu.barrier_wait(p_free)
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
      if cfg.skip == "math":
        plgpu.barrier_arrive(kv_free.at[slot])
        return acc
      plgpu.barrier_wait(p_ready)
      alpha = plgpu.load(row_smem, layout=row_layout)
      acc = pv(acc, alpha, kv_smem[1].at[slot])
      plgpu.barrier_arrive(p_free)
      plgpu.barrier_arrive(kv_free.at[slot])
      return acc

    acc = lax.fori_loop(0, steps, step, zeros_acc())
    plgpu.barrier_wait(p_ready)
    inv_l = plgpu.load(row_smem, layout=row_layout)
    plgpu.barrier_arrive(p_free)
    store_out(acc, inv_l, 1)
    plgpu.wait_smem_to_gmem(0)

  def _cp_async_gather(j_steps):
    """`cp_async_gather`: block j's copies are issued up to `stages` blocks ahead; once they have landed (all
    but the newer groups waited for, then a proxy fence) every thread arrives on kv_ready (count 128)."""
    def fetch(j):
      slot = slot_of(j)
      plgpu.copy_gmem_to_smem(idx_ref.at[b, t, pl.ds(j * bk, bk)], idx_smem.at[slot], idx_ready.at[slot])
      plgpu.barrier_wait(idx_ready.at[slot])
      flat = [lines.at[pl.ds(slot * bk * w, bk * w)] for (_, w), lines in zip(chunks, kv_lines)]
      if cfg.skip != "copies":
        cp_async_gather.issue_block(kv_ref.at[b], idx_smem.at[slot], flat, chunks=chunks, rows=bk)

    def publish(j, pending):
      cp_async_gather.wait(pending)
      plgpu.commit_smem()
      plgpu.barrier_arrive(kv_ready.at[slot_of(j)])

    # Block j + 1 is published before block j's release is awaited, as soon as its copies have landed: on the
    # H200 that took the forward from 5.96 to 4.65 ms (8K tokens, 128 heads), against publishing block j + 1
    # only after block j - 1's release had been awaited. (It also lets a consumer hold block j while it waits
    # for block j + 1: a wg 0 that issued block j + 1's QK^T before block j's softmax did that, and ran
    # slower, 6.42 ms, with one more accumulator in its registers; it was removed.)
    issued = min(cfg.stages, j_steps)
    for j in range(issued):
      fetch(jnp.int32(j))
    publish(jnp.int32(0), issued - 1)

    @pl.loop(0, max(j_steps - cfg.stages, 0))
    def _steady(j):
      publish(j + 1, cfg.stages - 2)
      plgpu.barrier_wait(kv_free.at[slot_of(j)])
      fetch(j + cfg.stages)

    for j in range(max(j_steps - cfg.stages, 0), j_steps - 1):
      publish(jnp.int32(j + 1), j_steps - 2 - j)
    for j in range(max(j_steps - cfg.stages, 0), j_steps):
      plgpu.barrier_wait(kv_free.at[j % cfg.stages])

  @pl.when(wg == 2)
  def _gather():
    plgpu.set_max_registers(GATHER_REGISTERS, action="decrease")

    def issue(j):
      slot = slot_of(j)
      plgpu.copy_gmem_to_smem(idx_ref.at[b, t, pl.ds(j * bk, bk)], idx_smem.at[slot], idx_ready.at[slot])
      plgpu.barrier_wait(idx_ready.at[slot])

      def copy_row(r, row):
        for (off, width), smem, lines in zip(chunks, kv_smem, kv_lines):
          if lines is None:
            plgpu.copy_gmem_to_smem(kv_ref.at[b, pl.ds(row, 1), pl.ds(off, width)],
                                    smem.at[slot, pl.ds(r, 1)], kv_ready.at[slot])
            continue
          for ct in range(width // 64):
            line = ((slot * (bk // 8) + r // 8) * (width // 64) + ct) * 8 + r % 8
            plgpu.copy_gmem_to_smem(kv_ref.at[b, pl.ds(row, 1), pl.ds(off + 64 * ct, 64)],
                                    lines.at[pl.ds(line, 1)], kv_ready.at[slot])

      issue_row_copies(bk, cfg.gather_warps, lambda r: idx_smem[slot, r], copy_row)

    if cfg.gather == "cp_async":
      _cp_async_gather(j_steps=steps)
      return

    for j in range(min(cfg.stages, steps)):
      issue(jnp.int32(j))

    @pl.loop(cfg.stages, steps)
    def _refill(j):
      plgpu.barrier_wait(kv_free.at[slot_of(j)])
      issue(j)

    # Observe the last releases too, so that every barrier phase has been waited on at exit.
    for j in range(max(steps - cfg.stages, 0), steps):
      plgpu.barrier_wait(kv_free.at[j % cfg.stages])


def token_grid(n_tiles: int, bsz: int, t: int, adjacent_tiles: bool):
  """(grid, grid_names) of the sparse MLA kernels: one CTA per (batch, token, head tile).

  Mosaic GPU launches the grid reversed (last axis -> CUDA x), and CUDA caps y and z at 65535 blocks, so the
  tokens go on x (T = 128K failed to launch with them on y). With `adjacent_tiles`, x enumerates (token, head
  tile) pairs, head tiles fastest."""
  if adjacent_tiles:
    return (bsz, t * n_tiles), ("b", "th")
  return (n_tiles, bsz, t), ("h", "b", "t")


def grid_position(n_tiles: int, adjacent_tiles: bool):
  """Kernel code: (batch, token, head tile) of this CTA in the grid of `token_grid`."""
  if adjacent_tiles:
    th = lax.axis_index("th")
    return lax.axis_index("b"), th // n_tiles, lax.rem(th, n_tiles)
  return lax.axis_index("b"), lax.axis_index("t"), lax.axis_index("h")


def _kv_buffer(stages: int, bk: int, width: int, dtype, interpret, gather="tma"):
  """SMEM for one column chunk of the gathered keys: (wgmma view, per-row TMA view or None).

  Mosaic only slices a tiled ref at whole 8-row tiles, so single gathered rows land through a second
  view of the same bytes as 128-byte lines (one TMA per row and 64 columns); with 128-byte swizzling the
  TMA unit swizzles each line by its SMEM address, which yields exactly the tiled, swizzled layout that
  wgmma reads. GPU interpret mode models views logically, so there rows are copied into the tiled view.
  """
  tiled = plgpu.SMEM((stages, bk, width), dtype, transforms=_TRANSFORMS)
  if gather == "cp_async":  # a flat view, written at swizzled addresses by `cp_async_gather`
    if interpret:
      raise ValueError("gather='cp_async' runs inline Mosaic GPU code, which GPU interpret mode cannot run.")
    return plgpu.RefUnion(tiled, plgpu.SMEM((stages * bk * width,), dtype))
  if interpret:
    return tiled, None
  lines = plgpu.SMEM((stages * bk * width // 64, 64), dtype,
                     transforms=(plgpu.TilingTransform((1, 64)), plgpu.SwizzleTransform(128)))
  return plgpu.RefUnion(tiled, lines)


def _copies_per_row(chunks, interpret) -> int:
  return len(chunks) if interpret else sum(w // 64 for _, w in chunks)


def sparse_mla_fwd(q: jax.Array, kv: jax.Array, indices: jax.Array, *, scale: float, v_dim: int,
                   config: Config = Config(), interpret=False) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Dk], kv [B, S, Dk], indices [B, T, K] (-1 = skip) -> (out [B, T, N, v_dim], lse [B, T, N])."""
  bsz, t, n, dk = q.shape
  chunks = column_chunks(dk, v_dim)
  n_pad = -n % HEAD_TILE
  q = jnp.pad(q, ((0, 0), (0, 0), (0, n_pad), (0, 0)))
  k_pad = -indices.shape[-1] % config.block_k
  indices = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad)), constant_values=-1)
  steps = indices.shape[-1] // config.block_k
  bk, stages, dtype = config.block_k, config.stages, q.dtype
  smem = functools.partial(plgpu.SMEM, dtype=dtype, transforms=_TRANSFORMS)
  n_tiles = (n + n_pad) // HEAD_TILE
  body = functools.partial(_body, chunks=chunks, steps=steps, scale=scale, cfg=config, n_tiles=n_tiles,
                           interpret=bool(interpret))
  grid, grid_names = token_grid(n_tiles, bsz, t, config.adjacent_tiles)
  out, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((bsz, t, n + n_pad, v_dim), dtype),
                jax.ShapeDtypeStruct((bsz, t, n + n_pad), jnp.float32)),
      scratch_types=(
          tuple(smem((HEAD_TILE, w)) for _, w in chunks),
          tuple(_kv_buffer(stages, bk, w, dtype, interpret, config.gather) for _, w in chunks),
          smem((HEAD_TILE, bk)),
          plgpu.SMEM((stages, bk), jnp.int32),
          plgpu.SMEM((HEAD_TILE,), jnp.float32),
          plgpu.Barrier(num_arrivals=len(chunks)),
          plgpu.Barrier(num_arrivals=1 if config.gather == "cp_async" else _copies_per_row(chunks, interpret) * bk,
                        num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(),
          plgpu.Barrier(),
      ),
      grid=grid,
      grid_names=grid_names,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                                          unsafe_no_auto_barriers=not config.auto_barriers),
      interpret=interpret,
  )(q, kv.astype(dtype), indices)
  return out[:, :, :n], lse[:, :, :n]
