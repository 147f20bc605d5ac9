"""Mosaic GPU kernel: lightning-indexer scores of decode rows over a paged key cache (as `reference.py`).

Decoding has one or two query rows per sequence, so the scores are bound by reading the keys (132 bytes per key
in FP8: 128 e4m3 values and a float32 scale), not by the matmul: 2 I H FLOP per key = 124 FLOP per byte at
V3.2's 64 x 128. The work is split over keys (split-K): CTA (q, s) scores tiles s * tiles_per_split, ... of 64
logical keys of row q, up to the row's last visible tile, so that a batch of one sequence still fills the GPU.

One warpgroup per CTA. It copies its row's query heads [I, H] and head weights once, then streams its key tiles
through a ring of STAGES SMEM slots: a tile is one TMA copy per page it spans (64 rows of one page, or 64 /
page_size whole pages), from the pool rows that the caller resolved through the block table (`tile_rows`), with
the keys' scales beside it. Per tile one wgmma logits [64 keys, I] = k_tile @ q^T (e4m3 x e4m3 or bf16 x bf16,
float32 accumulate; K-major operands, the keys' rows as M so that the head sum is a row reduction inside each
thread's quad), then ReLU, the head weights (with the q scales folded in), the head sum and the key scale in
registers; the tile's 64 scores go to GMEM by TMA while the next tiles load. The key scale (positive) multiplies
after ReLU and the head sum, and the q scale (positive) is folded into the weights: the same function with
another float32 rounding order than the reference's.

Output: float32 [Q, tiles * 64] with every visible key's score; the rest (past lengths[q] in its last tile, and
tiles beyond it) are not written: the caller masks by position. Limits: H a multiple of 64, I padded to a
multiple of 64 by the caller (`api.py`), page_size a multiple of 8 (32 with key scales, `page_size_ok`) dividing 64
or a multiple of 64, q and keys of
one dtype (bf16, or e4m3 on both sides). Today's figure: none measured yet (benchmarks/decode.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE = 64  # keys per wgmma (its M)
HEAD_ALIGN = 64  # index heads are padded to this (the wgmma N)
STAGES = 4  # key tiles in flight per CTA
# Split-K: one wave of CTAs over the SMs of an H100 / H200, as many per SM as their shared memory allows (two with
# bf16 keys, four with e4m3) up to MAX_CTAS_PER_SM: each CTA walks its tiles one after the other, so more CTAs
# per SM overlap more tiles' wgmma and epilogue latency, and keep more tile loads in flight. Not tuned yet.
SMS = 132
SMEM_PER_SM = 227 * 1024  # what the CTAs of one SM may share (228 KiB less 1 KiB reserved per CTA, about)
MAX_CTAS_PER_SM = 4


def page_size_ok(page_size: int, scales: bool) -> bool:
  """Whether the kernel takes pages of `page_size` keys. Every TMA copy must land on a 128-byte-aligned address of
  shared memory: a copy of key scales (float32, one per key of a page) is page_size x 4 bytes, so pages with
  scales need a multiple of 32 keys (pages of 16 crashed an H100 with CUDA_ERROR_MISALIGNED_ADDRESS; interpret
  mode does not check alignment)."""
  return page_size % (32 if scales else 8) == 0 and (TILE % page_size == 0 or page_size % TILE == 0)


def copies_per_tile(page_size: int, scales: bool) -> int:
  """TMA copies per 64-key tile: one per page when pages are shorter than a tile."""
  if not page_size_ok(page_size, scales):
    raise ValueError(f"page_size={page_size} is not supported by the index_decode kernel; allowed: a multiple of "
                     f"{32 if scales else 8} that divides {TILE}, or a multiple of {TILE}.")
  return max(1, TILE // page_size)


def tile_rows(pages: jax.Array, page_size: int, scales: bool) -> jax.Array:
  """pages [Q, max_pages] (the pool page of every logical page, `reference.visible_pages`) -> int32
  [Q, tiles * copies]: the first pool row of each copy of each 64-key tile; each copy stays inside one page (a
  partial last tile repeats the last copy)."""
  copies = copies_per_tile(page_size, scales)
  offsets = jnp.arange(0, page_size, min(page_size, TILE))  # copy starts inside a page
  starts = (pages[:, :, None] * page_size + offsets).reshape(pages.shape[0], -1)
  return jnp.pad(starts, ((0, 0), (0, -starts.shape[1] % copies)), mode="edge").astype(jnp.int32)


def smem_bytes(heads: int, dim: int, dtype, scales: bool) -> int:
  """Shared memory of one CTA (the scratch of `index_decode_scores`, barriers aside)."""
  itemsize = jnp.dtype(dtype).itemsize
  return heads * dim * itemsize + 4 * heads + STAGES * TILE * (dim * itemsize + 4 * scales) + 2 * TILE * 4


def default_splits(num_rows: int, tiles: int, cta_smem: int) -> int:
  """Key splits per row: CTAs for one wave (`SMS` x the CTAs per SM that `cta_smem` bytes allow), at least one per
  row and one tile per split."""
  per_sm = max(1, min(MAX_CTAS_PER_SM, SMEM_PER_SM // (cta_smem + 1024)))
  return max(1, min(tiles, SMS * per_sm // num_rows))


def index_decode_scores(q: jax.Array, w: jax.Array, idx_k: jax.Array, idx_scale: jax.Array | None,
                        starts: jax.Array, lengths: jax.Array, *, page_size: int, splits: int | None = None,
                        interpret=None) -> jax.Array:
  """q [Q, I, H] (I a multiple of 64), w [Q, I] float32 (the q scales folded in), idx_k [R_pool, H] of q's dtype,
  idx_scale [R_pool] float32 | None, starts [Q, tiles * copies] (`tile_rows`), lengths [Q] -> float32
  [Q, tiles * 64]: the scores of the visible keys, other entries unwritten (module docstring).

  splits: key splits per row (None: `default_splits`)."""
  num_rows, heads, dim = q.shape
  copies = copies_per_tile(page_size, idx_scale is not None)
  tiles = starts.shape[1] // copies
  if heads % HEAD_ALIGN or dim % 64 or q.dtype != idx_k.dtype or q.dtype not in (jnp.bfloat16, jnp.float8_e4m3fn):
    raise ValueError(f"index_decode kernel: q [Q, I, H] = {q.shape} {q.dtype} with keys {idx_k.dtype}; allowed: "
                     f"I a multiple of {HEAD_ALIGN}, H of 64, q and keys both bfloat16 or both float8_e4m3fn.")
  if splits is None:
    splits = default_splits(num_rows, tiles, smem_bytes(heads, dim, q.dtype, idx_scale is not None))
  per_split = -(-tiles // splits)
  itemsize = jnp.dtype(q.dtype).itemsize
  swizzle = plgpu.find_swizzle(dim * 8 * itemsize)  # rows of H elements
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  scales = [] if idx_scale is None else [idx_scale.astype(jnp.float32)]
  body = functools.partial(_kernel, copies=copies, copy_rows=min(page_size, TILE), per_split=per_split)
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((num_rows, tiles * TILE), jnp.float32),
      scratch_types=dict(
          q_smem=plgpu.SMEM((heads, dim), q.dtype, transforms=transforms),
          w_smem=plgpu.SMEM((heads,), jnp.float32),
          k_smem=plgpu.SMEM((STAGES, TILE, dim), q.dtype, transforms=transforms),
          scale_smem=[plgpu.SMEM((STAGES, TILE), jnp.float32) for _ in scales],
          out_smem=plgpu.SMEM((2, TILE), jnp.float32),
          q_barrier=plgpu.Barrier(num_arrivals=2),
          k_barriers=plgpu.Barrier(num_arrivals=copies * (1 + len(scales)), num_barriers=STAGES),
      ),
      grid=(num_rows, splits),
      grid_names=("q", "split"),
      kernel_name="_index_decode_scores",
      interpret=interpret,
  )(q, w.astype(jnp.float32), idx_k, starts.astype(jnp.int32), lengths.astype(jnp.int32), *scales)


def _kernel(q_ref, w_ref, k_ref, starts_ref, lengths_ref, *scale_and_out, q_smem, w_smem, k_smem, scale_smem,
            out_smem, q_barrier, k_barriers, copies, copy_rows, per_split):
  *scale_ref, out_ref = scale_and_out  # scale_ref and scale_smem: one entry each with key scales, or none
  row, split = lax.axis_index("q"), lax.axis_index("split")
  first = split * per_split
  visible_tiles = (lengths_ref[row] + TILE - 1) // TILE
  count = jnp.clip(visible_tiles - first, 0, per_split)

  def fetch(i):
    """Tile first + i into slot i % STAGES: its copies of keys (and scales) on the slot's barrier."""
    slot = lax.rem(i, STAGES)
    for c in range(copies):
      start = pl.multiple_of(starts_ref[row, (first + i) * copies + c], copy_rows)  # pages start at multiples of 8
      rows, dst = pl.ds(start, copy_rows), pl.ds(c * copy_rows, copy_rows)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot, dst], k_barriers.at[slot])
      for src, smem in zip(scale_ref, scale_smem):
        plgpu.copy_gmem_to_smem(src.at[rows], smem.at[slot, dst], k_barriers.at[slot])

  @pl.when(count > 0)
  def _scores():
    plgpu.copy_gmem_to_smem(q_ref.at[row], q_smem, q_barrier)
    plgpu.copy_gmem_to_smem(w_ref.at[row], w_smem, q_barrier)
    for i in range(STAGES):
      @pl.when(i < count)
      def _prologue():
        fetch(jnp.int32(i))

    plgpu.barrier_wait(q_barrier)
    heads = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA.reduce(0))

    @pl.loop(0, count)
    def _tile(i):
      slot = lax.rem(i, STAGES)
      plgpu.barrier_wait(k_barriers.at[slot])

      def logits_of(acc_ref):
        plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.transpose((1, 0)))
        return acc_ref[...]

      logits = pl.run_scoped(logits_of, plgpu.ACC((TILE, q_smem.shape[0]), jnp.float32))
      key_scales = [plgpu.load(smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1)) for smem in scale_smem]

      @pl.when(i + STAGES < count)  # the wgmma and the scale load are done with the slot
      def _refill():
        if scale_smem:
          plgpu.commit_smem()  # a proxy fence: the scales' (generic) load before the TMA (async proxy) overwrites
        fetch(i + STAGES)

      scores = (jnp.maximum(logits, 0.0) * lax.broadcast_in_dim(heads, logits.shape, [1])).sum(axis=1)
      for key_scale in key_scales:
        scores = scores * key_scale
      out = out_smem.at[lax.rem(i, 2)]
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copy out of this buffer two tiles ago has read it
      out[...] = scores
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out, out_ref.at[row, pl.ds(pl.multiple_of((first + i) * TILE, TILE), TILE)])

    plgpu.wait_smem_to_gmem(0)
