"""Dense indexer-KL statistics on Hopper with Pallas Mosaic GPU: one query token per CTA, streamed keys.

DeepSeek-V3.2 dense warm-up (arXiv 2512.02556, section 2.1): per query t the loss
KL(p[t, :] || softmax(I[t, :])) needs, over the visible keys s, five numbers: the running max m and sum l
of I's logsumexp, and z = sum p, a = sum p I, c = sum p log p, where p[t, s] = sum_h exp(scale q[t, h].k[s]
- lse[t, h]) and I[t, s] = sum_j w[t, j] ReLU(iq[t, j].ik[s]); then KL = c/z - log z - a/z + m + log l
(`chunked.dense_kl` folds the same statistics). Nothing of size [T, S] is written.

One CTA owns one query token and two warpgroups:
  * wg 1 (memory) streams the token's key tiles of BLOCK_S = 64 keys through a ring of `stages` SMEM slots
    of 64 keys x 64 columns (the 576-dim latent key is 9 such chunks, the 128-dim index key 2), plus the
    tile's key positions and segment ids, with TMA.
  * wg 0 (compute) holds the token's attention query [N, C] and index query [I, H] in SMEM and per tile
    runs two wgmmas with the keys as M: logits [64 keys, N heads] and index logits [64 keys, I heads],
    so the sum over heads is a row reduction inside each warp (no SMEM scratch). It releases each ring
    slot as soon as the wgmma that read it has retired (`wgmma_wait(1)`), which is what lets a ring
    smaller than one tile stream it. The epilogue turns the tile into p and I per key and updates the
    five statistics per key lane ([64] vectors, no cross-lane reduction in the loop).
The CTA writes its per-lane statistics [5, 64]; `combine` reduces the lanes in XLA (1.3 KB per token) and
`kl_from_stats` turns them into the KL. What the four per-token kernels share (ring, launch, the wgmma over
ring slots, the statistics update) is in `per_token_cta`.

Why this shape: the V3.2 query is 128 heads x 576 bf16 = 144 KiB, so one token's query fills most of the
227 KiB of SMEM and no tile of several tokens fits; a whole 64-key tile (88 KiB with the index key) does
not fit beside it either, hence the sub-tile ring (7 slots of 8 KiB at V3.2 shapes, more for smaller
models). Keys are re-read by every token's CTA, from L2 for neighbouring tokens running together.
Masked tiles are skipped: `visibility.visible_block_ranges` gives each token the first and one-past-last key
tile that holds a visible key (causal order and segments), and only those are streamed.

Heads are padded to a multiple of HEAD_MULTIPLE (padded attention heads get lse = +inf, so p = 0; padded
index heads get w = 0), the key dims to a multiple of 64 with zeros, keys to a multiple of 64 with
position INT32_MAX (never visible). Computation in bf16 with float32 accumulation, like the other kernels.
Today's figure (T = 128K, V3.2 shapes, H200): about 475 TF/s of useful causal work, benchmarks/indexer_kl.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.indexer_kl import per_token_cta
from pallas_kernels.indexer_kl.per_token_cta import BLOCK_S, CHUNK, FLOOR, LOG2E, round_up
from pallas_kernels.visibility import PAD_POSITION, visible_block_ranges

HEAD_MULTIPLE = 16
MAX_HEADS = 256  # wgmma N
NUM_STATS = 5  # m, l, z, a, c
MAX_STAGES = 12  # ring slots, if they fit in SMEM
# Pallas's automatic warpgroup barriers around SMEM accesses: cheap here (12 copies per 64-key tile).
AUTO_BARRIERS = True


def stages_for(n: int, c: int, i: int, h: int) -> int:
  """Ring slots that fit beside the queries for padded head counts n, i and padded dims c, h."""
  buffers = (2 * c * n, 2 * h * i, 4 * n, 4 * i, 4 * 2 * 2 * BLOCK_S, 4 * NUM_STATS * BLOCK_S)
  return per_token_cta.ring_stages(buffers, MAX_STAGES)


def padded_dims(n: int, c: int, i: int, h: int) -> tuple[int, int, int, int]:
  return round_up(n, HEAD_MULTIPLE), round_up(c, CHUNK), round_up(i, HEAD_MULTIPLE), round_up(h, CHUNK)


def supports(num_heads: int, key_dim: int, index_heads: int, index_dim: int) -> bool:
  """Whether the kernel handles these sizes (the API's automatic choice asks this)."""
  n, c, i, h = padded_dims(num_heads, key_dim, index_heads, index_dim)
  return n <= MAX_HEADS and i <= MAX_HEADS and stages_for(n, c, i, h) >= 2


def combine(partials: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-lane statistics [B, T, 5, 64] -> per token (m, l, z, a, c), each float32 [B, T]."""
  m_lane, l_lane, z, a, c = (partials[..., k, :] for k in range(NUM_STATS))
  m = m_lane.max(-1)
  l = (l_lane * jnp.exp(m_lane - m[..., None])).sum(-1)
  return m, l, z.sum(-1), a.sum(-1), c.sum(-1)


def kl_from_stats(m, l, z, a, c) -> tuple[jax.Array, jax.Array]:
  """Per-token statistics from `combine` -> (KL, logsumexp(I)), each [B, T]; KL = 0 for a token without keys."""
  has_keys = z > 0
  z_safe = jnp.where(has_keys, z, 1.0)
  lse_scores = m + jnp.log(jnp.where(has_keys, l, 1.0))
  return jnp.where(has_keys, c / z_safe - jnp.log(z_safe) - a / z_safe + lse_scores, 0.0), lse_scores


def load_query(b, t, q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, q_bar):
  """Copies token t's queries, lse and w into SMEM; returns lse * log2(e) and w, as [heads] vectors."""
  copies = [(q_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)], q_smem.at[k]) for k in range(q_smem.shape[0])]
  copies += [(iq_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)], iq_smem.at[k]) for k in range(iq_smem.shape[0])]
  copies += [(lse_ref.at[b, t], lse_smem), (w_ref.at[b, t], w_smem)]
  for src, dst in copies:
    plgpu.copy_gmem_to_smem(src, dst, q_bar)
  plgpu.barrier_wait(q_bar)
  cols = plgpu.Layout.WGMMA.reduce(0)
  return plgpu.load(lse_smem, (), layout=cols) * LOG2E, plgpu.load(w_smem, (), layout=cols)


def key_visibility(pos_smem, pos_ready, pos_free, n, q_pos, q_seg):
  """Which keys of the n-th streamed tile the token sees ([64] bool); releases the positions buffer."""
  rows = plgpu.Layout.WGMMA.reduce(1)
  ps = lax.rem(n, 2)
  plgpu.barrier_wait(pos_ready.at[ps])
  kv_pos = plgpu.load(pos_smem.at[ps, 0], (), layout=rows)
  kv_seg = plgpu.load(pos_smem.at[ps, 1], (), layout=rows)
  plgpu.commit_smem()  # order these reads before the TMA that refills the buffer (async proxy)
  plgpu.barrier_arrive(pos_free.at[ps])
  return (kv_pos <= q_pos) & (kv_seg == q_seg)


def _compute(lohi_ref, qvis_ref, q_ref, iq_ref, lse_ref, w_ref, out_ref, q_smem, iq_smem, lse_smem, w_smem,
             ring, pos_smem, out_smem, q_bar, ready, free, pos_ready, pos_free, *, scale, stages):
  b, t = lax.axis_index("b"), lax.axis_index("t")
  lo, hi = lohi_ref[b, t, 0], lohi_ref[b, t, 1]
  q_pos, q_seg = qvis_ref[b, t, 0], qvis_ref[b, t, 1]
  n_chunks = q_smem.shape[0]
  per_tile = n_chunks + iq_smem.shape[0]
  lse2, w = load_query(b, t, q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, q_bar)

  def tile(j, stats):
    n = j - lo
    g0 = n * per_tile
    logits = per_token_cta.stream_matmul(ring, ready, free, stages, g0, q_smem)
    index_logits = per_token_cta.stream_matmul(ring, ready, free, stages, g0 + n_chunks, iq_smem)
    keep = key_visibility(pos_smem, pos_ready, pos_free, n, q_pos, q_seg)
    p = jnp.where(keep, per_token_cta.attention_mass(logits, lse2, scale), 0.0)
    scores = jnp.where(keep, per_token_cta.index_scores(index_logits, w), FLOOR)
    return per_token_cta.update_stats(stats, p, scores, keep)

  stats = lax.fori_loop(lo, hi, tile, per_token_cta.initial_stats())
  per_token_cta.write_stats(stats, out_smem, out_ref, b, t)


def stream_keys(lohi_ref, k_ref, ik_ref, kvvis_ref, ring, pos_smem, ready, free, pos_ready, pos_free, *, n_chunks,
                i_chunks, stages):
  """The memory warpgroup (also `kernel_dense_bwd`'s): per visible key tile its positions into a double
  buffer, then its n_chunks attention-key and i_chunks index-key chunks into the ring, in that order."""
  b, t = lax.axis_index("b"), lax.axis_index("t")
  lo, hi = lohi_ref[b, t, 0], lohi_ref[b, t, 1]
  per_tile = n_chunks + i_chunks

  def slot_of(g):
    return lax.rem(g, jnp.int32(stages))

  @pl.loop(lo, hi)
  def _tile(j):
    n = j - lo
    keys = pl.ds(j * BLOCK_S, BLOCK_S)
    ps = lax.rem(n, 2)

    @pl.when(n >= 2)
    def _():
      plgpu.barrier_wait(pos_free.at[ps])

    plgpu.copy_gmem_to_smem(kvvis_ref.at[b, :, keys], pos_smem.at[ps], pos_ready.at[ps])
    for k in range(per_tile):
      slot = per_token_cta.acquire_slot(free, n * per_tile + k, stages)
      src = k_ref if k < n_chunks else ik_ref
      col = k if k < n_chunks else k - n_chunks
      plgpu.copy_gmem_to_smem(src.at[b, keys, pl.ds(col * CHUNK, CHUNK)], ring.at[slot], ready.at[slot])

  # Observe the last releases too, so that every barrier phase has been waited on at exit.
  total = (hi - lo) * per_tile

  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _drain(g):
    plgpu.barrier_wait(free.at[slot_of(g)])

  @pl.loop(jnp.maximum(hi - lo - 2, 0), hi - lo)
  def _drain_pos(n):
    plgpu.barrier_wait(pos_free.at[lax.rem(n, 2)])


def _body(lohi_ref, qvis_ref, kvvis_ref, q_ref, k_ref, lse_ref, iq_ref, ik_ref, w_ref, out_ref, q_smem, iq_smem,
          lse_smem, w_smem, ring, pos_smem, out_smem, q_bar, ready, free, pos_ready, pos_free, *, scale, stages):
  per_token_cta.split_warpgroups(
      functools.partial(_compute, lohi_ref, qvis_ref, q_ref, iq_ref, lse_ref, w_ref, out_ref, q_smem, iq_smem,
                        lse_smem, w_smem, ring, pos_smem, out_smem, q_bar, ready, free, pos_ready, pos_free,
                        scale=scale, stages=stages),
      functools.partial(stream_keys, lohi_ref, k_ref, ik_ref, kvvis_ref, ring, pos_smem, ready, free, pos_ready,
                        pos_free, n_chunks=q_smem.shape[0], i_chunks=iq_smem.shape[0], stages=stages))


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def padded_operands(attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, q_positions, kv_positions, q_segment_ids,
                    kv_segment_ids, *, index_heads: int) -> tuple[jax.Array, ...]:
  """The kernels' operands (this one's and `kernel_dense_bwd`'s): bf16 matmul inputs padded as the module
  docstring says (index heads to `index_heads`), the per-token key-tile ranges [B, T, 2], the query
  (position, segment) [B, T, 2] and the key (positions, segments) [B, 2, S_pad] (one TMA per tile)."""
  n, c = attn_q.shape[2:]
  n_p, c_p, _, h_p = padded_dims(n, c, *idx_q.shape[2:])
  s_p = round_up(attn_k.shape[1], BLOCK_S)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  q = _pad_axis(_pad_axis(bf16(attn_q), 2, n_p), 3, c_p)
  k = _pad_axis(_pad_axis(bf16(attn_k), 1, s_p), 2, c_p)
  lse = _pad_axis(attn_lse.astype(jnp.float32), 2, n_p, jnp.inf)
  iq = _pad_axis(_pad_axis(bf16(idx_q), 2, index_heads), 3, h_p)
  ik = _pad_axis(_pad_axis(bf16(idx_k), 1, s_p), 2, h_p)
  w = _pad_axis(idx_w.astype(jnp.float32), 2, index_heads)
  kv_pos = _pad_axis(kv_positions.astype(jnp.int32), 1, s_p, PAD_POSITION)
  kv_seg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, s_p)
  q_pos, q_seg = q_positions.astype(jnp.int32), q_segment_ids.astype(jnp.int32)
  lohi = visible_block_ranges(q_pos, kv_pos, q_seg, kv_seg, BLOCK_S)
  qvis = jnp.stack([q_pos, q_seg], axis=-1)
  kvvis = jnp.stack([kv_pos, kv_seg], axis=1)
  return lohi, qvis, kvvis, q, k, lse, iq, ik, w


def dense_stats(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, *, q_positions, kv_positions,
                q_segment_ids, kv_segment_ids, interpret=False) -> jax.Array:
  """Per-lane statistics float32 [B, T, 5, 64] of the dense KL (reduce them with `combine`).

  attn_q [B, T, N, C], attn_k [B, S, C], attn_lse [B, T, N], idx_q [B, T, I, H], idx_k [B, S, H],
  idx_w [B, T, I]; positions and segment ids [B, T] / [B, S]. Any T; S is padded here.
  """
  bsz, t, n, c = attn_q.shape
  i, h = idx_q.shape[2:]
  n_p, c_p, i_p, h_p = padded_dims(n, c, i, h)
  stages = stages_for(n_p, c_p, i_p, h_p)
  if not supports(n, c, i, h):
    raise ValueError(f"Unsupported sizes: heads {n} x {c}, index heads {i} x {h} (padded {n_p}, {i_p} must be "
                     f"<= {MAX_HEADS}; queries must leave SMEM for >= 2 ring slots, have {stages}).")
  lohi, qvis, kvvis, q, k, lse, iq, ik, w = padded_operands(
      attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
      index_heads=i_p)

  return per_token_cta.launch_per_token(
      functools.partial(_body, scale=float(attn_scale), stages=stages),
      (bsz, t),
      out_type=jax.ShapeDtypeStruct((bsz, t, NUM_STATS, BLOCK_S), jnp.float32),
      scratch_types=(
          *per_token_cta.query_scratch(n_p, c_p, i_p, h_p),
          per_token_cta.wgmma_smem((stages, BLOCK_S, CHUNK)),
          plgpu.SMEM((2, 2, BLOCK_S), jnp.int32),
          plgpu.SMEM((NUM_STATS, BLOCK_S), jnp.float32),
          *per_token_cta.barriers(c_p // CHUNK + h_p // CHUNK + 2, stages),
      ),
      params=per_token_cta.compiler_params(auto_barriers=AUTO_BARRIERS),
      interpret=interpret,
  )(lohi, qvis, kvvis, q, k, lse, iq, ik, w)
