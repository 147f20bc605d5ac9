"""The CTA shape of the four indexer-KL kernels (`kernel_dense`, `kernel_dense_bwd`, `kernel_sparse`,
`kernel_sparse_bwd`): one query token per CTA of two warpgroups, keys streamed in tiles of BLOCK_S = 64
through a ring of 64 keys x 64 columns bf16 SMEM slots (`kernel_dense` says why).

Here: the ring's sizes and SMEM budget, the query buffers and barriers every kernel declares, the launch
(grid (B, T); warpgroup 0 computes, 1 moves memory), the hand-off of ring slots and the wgmma over a tile's
slots, p and I per key, and the forward's five running statistics per key lane (m, l of I's logsumexp,
z = sum p, a = sum p I, c = sum p log p; the module docstring of `kernel_dense` derives them).
"""

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_S = 64  # keys per tile: the wgmma M of one warpgroup
CHUNK = 64  # columns per ring slot and per query chunk (128-byte swizzled bf16 rows)
SMEM_BYTES = 232448  # Hopper's shared memory per block
TRANSFORMS = (plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128))
LOG2E = math.log2(math.e)
FLOOR = -1e30  # finite "minus infinity" of the running max: keeps exp(m - m_new) finite


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def ring_stages(buffer_bytes, max_stages: int) -> int:
  """Ring slots that fit in SMEM beside buffers of these sizes: Mosaic aligns every buffer to 1 KiB and the
  barriers take the last KiB."""
  fixed = sum(round_up(x, 1024) for x in buffer_bytes) + 1024
  return min(max_stages, max((SMEM_BYTES - fixed) // (2 * BLOCK_S * CHUNK), 0))


def wgmma_smem(shape) -> plgpu.SMEM:
  """bf16 SMEM in the tiled, 128-byte swizzled layout that wgmma reads."""
  return plgpu.SMEM(shape, jnp.bfloat16, transforms=TRANSFORMS)


def query_scratch(n_p: int, c_p: int, i_p: int, h_p: int):
  """SMEM of the token's attention query [C / 64, N, 64], index query [H / 64, I, 64], lse [N] and w [I]."""
  return (wgmma_smem((c_p // CHUNK, n_p, CHUNK)), wgmma_smem((h_p // CHUNK, i_p, CHUNK)),
          plgpu.SMEM((n_p,), jnp.float32), plgpu.SMEM((i_p,), jnp.float32))


def barriers(query_copies: int, stages: int, ring_arrivals: int = 1):
  """The query's (one arrival per TMA), ready and free per ring slot, and ready and free of the double-buffered
  per-tile positions or indices."""
  return (plgpu.Barrier(num_arrivals=query_copies), plgpu.Barrier(num_arrivals=ring_arrivals, num_barriers=stages),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2))


def compiler_params(*, auto_barriers: bool, reduction_scratch_bytes: int = 0) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=reduction_scratch_bytes,
                              unsafe_no_auto_barriers=not auto_barriers)


def interpret_params(interpret: bool):
  """The kernels' `interpret` argument: GPU interpret mode with race detection, or compiled."""
  return plgpu.InterpretGPUParams(detect_races=True) if interpret else False


def launch_per_token(body, grid, *, out_type, scratch_types, params, interpret):
  """`plgpu.kernel` of body over grid (B, T) named ("b", "t"), two warpgroups named "wg"."""
  return plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch_types,
      # Tokens last: Mosaic GPU launches the grid reversed (last axis -> CUDA x, not capped at 65535 blocks).
      grid=grid,
      grid_names=("b", "t"),
      num_threads=2,
      thread_name="wg",
      compiler_params=params,
      interpret=interpret,
  )


def split_warpgroups(compute, memory):
  """Runs compute() on warpgroup 0 with most of the registers and memory() on warpgroup 1 with few."""
  wg = lax.axis_index("wg")

  @pl.when(wg == 0)
  def _():
    plgpu.set_max_registers(232, action="increase")
    compute()

  @pl.when(wg == 1)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    memory()


def acquire_slot(free, g, stages):
  """The ring slot of chunk g (g mod stages), once its previous chunk's reader has released it."""
  slot = lax.rem(g, jnp.int32(stages))

  @pl.when(g >= stages)
  def _():
    plgpu.barrier_wait(free.at[slot])

  return slot


def stream_matmul(ring, ready, free, stages, g0, b_smem, release=True):
  """acc [64 keys, width] = sum over chunks k of ring[g0 + k] @ b_smem[k]^T (ring: the wgmma view).

  With `release`, each ring slot is released as soon as the wgmma that read it has retired
  (`wgmma_wait(1)`), which lets a ring smaller than one tile stream it; otherwise the caller releases them."""
  slot_of = lambda g: lax.rem(g, jnp.int32(stages))
  chunks = b_smem.shape[0]

  def body(acc_ref):
    for k in range(chunks):
      slot = slot_of(g0 + k)
      plgpu.barrier_wait(ready.at[slot])
      plgpu.wgmma(acc_ref, ring.at[slot], b_smem.at[k].transpose((1, 0)))
      if k and release:
        plgpu.wgmma_wait(1)  # the previous chunk's wgmma has retired: its slot may be refilled
        plgpu.barrier_arrive(free.at[slot_of(g0 + k - 1)])
    out = acc_ref[...]
    if release:
      plgpu.barrier_arrive(free.at[slot_of(g0 + chunks - 1)])
    return out

  return pl.run_scoped(body, plgpu.ACC((BLOCK_S, b_smem.shape[1]), jnp.float32))


def attention_mass(logits, lse2, scale):
  """p per key [64] = sum_h exp(scale logits - lse) of a tile's logits [64 keys, N] (lse2 = lse log2(e))."""
  s = logits * (scale * LOG2E) - lax.broadcast_in_dim(lse2, logits.shape, [1])
  return jnp.exp2(s).sum(axis=1)


def index_scores(index_logits, w):
  """I per key [64] = sum_j w_j ReLU(L[:, j]) of a tile's index logits L [64 keys, I]."""
  return (jnp.maximum(index_logits, 0.0) * lax.broadcast_in_dim(w, index_logits.shape, [1])).sum(axis=1)


def initial_stats():
  vec = lambda v: plgpu.layout_cast(jnp.full((BLOCK_S,), v, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  return vec(FLOOR), vec(0.0), vec(0.0), vec(0.0), vec(0.0)


def update_stats(stats, p, scores, keep):
  """Folds one tile into the per-lane (m, l, z, a, c); p is 0 and scores FLOOR where not `keep`."""
  m, l, z, a, c = stats
  m_new = jnp.maximum(m, scores)
  l = l * jnp.exp2((m - m_new) * LOG2E) + jnp.where(keep, jnp.exp2((scores - m_new) * LOG2E), 0.0)
  z = z + p
  a = a + p * jnp.where(keep, scores, 0.0)
  c = c + jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return m_new, l, z, a, c


def write_stats(stats, out_smem, out_ref, b, t):
  """The per-lane statistics [5, 64] through SMEM to out_ref[b, t]."""
  for k, v in enumerate(stats):
    out_smem.at[k][...] = v
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, t])
  plgpu.wait_smem_to_gmem(0)
