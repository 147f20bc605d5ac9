"""Sparse-stage indexer-KL statistics on Hopper with Pallas Mosaic GPU: one query token per CTA, its selected
keys gathered row by row.

DeepSeek-V3.2 sparse training (arXiv 2512.02556, section 2.1): per query t the loss
KL(p[t, S_t] || softmax(I[t, S_t])) over the selected set S_t = indices[t, :], with
p[t, s] = sum_h exp(scale q[t, h].k[s] - lse[t, h]) (renormalised over S_t) and
I[t, s] = sum_j w[t, j] ReLU(iq[t, j].ik[s]). As in the dense kernel (`kernel_dense`, whose statistics and
`combine` this reuses), five running numbers per key lane suffice: the max m and sum l of I's logsumexp,
z = sum p, a = sum p I and c = sum p log p; then KL = c/z - log z - a/z + m + log l.

One CTA owns one query token and two warpgroups:
  * wg 1 (memory, `gather`) walks the token's selected keys in blocks of BLOCK_S = 64: it copies the index
    block into SMEM and then, per 64-column chunk of the keys (the 576-dim latent key is 9 chunks, the
    128-dim index key 2), gathers the 64 selected rows with one TMA each into a ring slot of 64 keys x 64
    columns. Hopper has no TMA gather; a single row lands in the swizzled, tiled layout that wgmma reads
    through a second view of the slot as 128-byte lines (as in `sparse_mla.kernel_fwd`).
  * wg 0 (compute) holds the token's attention query [N, C] and index query [I, H] in SMEM and per block
    runs the dense kernel's two wgmmas with the keys as M: logits [64 keys, N heads] and index logits
    [64 keys, I heads], so the sums over heads are row reductions inside each warp. It releases each ring
    slot as soon as the wgmma that read it has retired.

SMEM at V3.2 shapes (bf16): the query 144 KiB + the index query 16 KiB + small buffers leave room for 7 ring
slots of 8 KiB (the dense kernel's budget: a whole 88 KiB key block does not fit beside the query).
Each 64-key block costs 11 x 64 row copies of 128 bytes, issued by one thread: at ~15 cycles per copy
the gather, not the tensor cores, is expected to bound this kernel.

Validity (causal order, segments, -1 slots) is folded into the index list by `selected_keys` in XLA, so
the kernel only tests idx >= 0 (an invalid slot gathers row 0 and is masked). Indices within a row must
be distinct (top-k output), as for the chunked XLA path. Attention heads are padded to a multiple of 16
(lse = +inf, so p = 0), index heads to INDEX_HEADS (w = 0), key dims to multiples of 64 with zeros.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.indexer_kl import kernel_dense
from pallas_kernels.indexer_kl.kernel_dense import BLOCK_S, CHUNK, HEAD_MULTIPLE, MAX_HEADS, NUM_STATS

INDEX_HEADS = 64  # index heads padded to one wgmma M: the backward's d iq product has them as M
TRANSFORMS = (plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128))
_LINE_TRANSFORMS = (plgpu.TilingTransform((1, CHUNK)), plgpu.SwizzleTransform(128))
LOG2E = math.log2(math.e)
_FLOOR = -1e30  # finite "minus infinity" of the running max: keeps exp(m - m_new) finite


@dataclasses.dataclass(frozen=True)
class Config:
  max_stages: int = 12  # ring slots, if they fit in SMEM


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def padded_dims(n: int, c: int, i: int, h: int) -> tuple[int, int, int, int]:
  return _round_up(n, HEAD_MULTIPLE), _round_up(c, CHUNK), INDEX_HEADS, _round_up(h, CHUNK)


def forward_stages(n_p: int, c_p: int, i_p: int, h_p: int, config: Config = Config()) -> int:
  """Ring slots of the forward: its fixed buffers are the dense kernel's (the index block takes the place
  of the key positions), so its budget is too."""
  return kernel_dense.stages_for(n_p, c_p, i_p, h_p, kernel_dense.Config(max_stages=config.max_stages))


def supports(num_heads: int, key_dim: int, index_heads: int, index_dim: int) -> bool:
  """Whether the forward kernel handles these sizes (the API asks this and `kernel_sparse_bwd.supports`)."""
  n, c, i, h = padded_dims(num_heads, key_dim, index_heads, index_dim)
  return n <= MAX_HEADS and index_heads <= INDEX_HEADS and forward_stages(n, c, i, h) >= 2


def selected_keys(indices, q_positions, kv_positions, q_segment_ids, kv_segment_ids) -> jax.Array:
  """int32 [B, T, K_pad]: `indices` [B, T, K] with every slot that is -1, later than its query or in another
  document set to -1, padded with -1 to a multiple of BLOCK_S."""
  take = jax.vmap(lambda x, i: x[i])  # per batch: [S][T, K] -> [T, K]
  safe = jnp.where(indices >= 0, indices, 0)
  keep = ((indices >= 0) & (take(kv_positions, safe) <= q_positions[..., None])
          & (take(kv_segment_ids, safe) == q_segment_ids[..., None]))
  sel = jnp.where(keep, indices, -1).astype(jnp.int32)
  return jnp.pad(sel, ((0, 0), (0, 0), (0, -sel.shape[-1] % BLOCK_S)), constant_values=-1)


def _pad(x: jax.Array, sizes: dict[int, int], value=0) -> jax.Array:
  """Pads axis a of x at the end to sizes[a]."""
  widths = [(0, sizes.get(a, d) - d) for a, d in enumerate(x.shape)]
  return jnp.pad(x, widths, constant_values=value)


def padded_operands(attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w):
  """The kernels' operands: bf16 keys and queries, float32 lse and w, heads and dims padded."""
  n_p, c_p, i_p, h_p = padded_dims(*attn_q.shape[2:], *idx_q.shape[2:])
  bf16 = lambda x: x.astype(jnp.bfloat16)
  return (_pad(bf16(attn_q), {2: n_p, 3: c_p}), _pad(bf16(attn_k), {2: c_p}),
          _pad(attn_lse.astype(jnp.float32), {2: n_p}, jnp.inf), _pad(bf16(idx_q), {2: i_p, 3: h_p}),
          _pad(bf16(idx_k), {2: h_p}), _pad(idx_w.astype(jnp.float32), {2: i_p}))


def ring_buffer(stages: int, interpret: bool):
  """The ring (wgmma view [stages, 64 keys, 64 columns], per-row TMA view as 128-byte lines or None).

  Interpret mode models views logically, so there rows are copied into the tiled view directly."""
  tiled = plgpu.SMEM((stages, BLOCK_S, CHUNK), jnp.bfloat16, transforms=TRANSFORMS)
  if interpret:
    return tiled, None
  return plgpu.RefUnion(tiled, plgpu.SMEM((stages * BLOCK_S, CHUNK), jnp.bfloat16, transforms=_LINE_TRANSFORMS))


def gather(sel_ref, k_ref, ik_ref, ring, idx_smem, ready, free, idx_ready, idx_free, *, n_chunks, i_chunks,
           stages):
  """Memory warpgroup: per block of 64 selected keys the index block, then chunk by chunk one TMA per row.

  Ring slot g % stages holds chunk g = block * (n_chunks + i_chunks) + k: the latent key's chunks first,
  then the index key's. idx_smem is double-buffered and released by the compute warpgroup (idx_free).
  """
  ring, lines = ring
  b, t = lax.axis_index("b"), lax.axis_index("t")
  blocks = sel_ref.shape[-1] // BLOCK_S
  per_block = n_chunks + i_chunks
  slot_of = lambda g: lax.rem(g, jnp.int32(stages))

  @pl.loop(0, blocks)
  def _block(n):
    ps = lax.rem(n, 2)

    @pl.when(n >= 2)
    def _():
      plgpu.barrier_wait(idx_free.at[ps])

    plgpu.copy_gmem_to_smem(sel_ref.at[b, t, pl.ds(n * BLOCK_S, BLOCK_S)], idx_smem.at[ps], idx_ready.at[ps])
    plgpu.barrier_wait(idx_ready.at[ps])
    for k in range(per_block):
      g = n * per_block + k
      slot = slot_of(g)

      @pl.when(g >= stages)
      def _():
        plgpu.barrier_wait(free.at[slot])

      src, col = (k_ref, k) if k < n_chunks else (ik_ref, k - n_chunks)

      @pl.loop(0, BLOCK_S)
      def _row(r):
        row = src.at[b, pl.ds(jnp.maximum(idx_smem[ps, r], 0), 1), pl.ds(col * CHUNK, CHUNK)]
        dst = ring.at[slot, pl.ds(r, 1)] if lines is None else lines.at[pl.ds(slot * BLOCK_S + r, 1)]
        plgpu.copy_gmem_to_smem(row, dst, ready.at[slot])

    plgpu.commit_smem()  # order this block's index reads before the TMA that refills idx_smem

  # Observe the last releases too, so that every barrier phase has been waited on at exit.
  total = blocks * per_block

  @pl.loop(max(total - stages, 0), total)
  def _drain(g):
    plgpu.barrier_wait(free.at[slot_of(g)])

  @pl.loop(max(blocks - 2, 0), blocks)
  def _drain_idx(n):
    plgpu.barrier_wait(idx_free.at[lax.rem(n, 2)])


def ring_matmul(ring, ready, free, g0, b_smem, *, stages, release=True):
  """acc [64 keys, width] = sum over chunks k of ring[g0 + k] @ b_smem[k]^T.

  With `release`, each slot is freed as soon as the wgmma that read it has retired (which lets a ring
  smaller than one block stream it); otherwise the caller frees them."""
  ring = ring[0]
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


def load_queries(q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, bar, w_copies=()):
  """The token's queries, lse and w into SMEM (w also into each of `w_copies`), all on barrier `bar`."""
  b, t = lax.axis_index("b"), lax.axis_index("t")
  copies = [(q_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)], q_smem.at[k]) for k in range(q_smem.shape[0])]
  copies += [(iq_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)], iq_smem.at[k]) for k in range(iq_smem.shape[0])]
  copies += [(lse_ref.at[b, t], lse_smem)] + [(w_ref.at[b, t], dst) for dst in (w_smem, *w_copies)]
  for src, dst in copies:
    plgpu.copy_gmem_to_smem(src, dst, bar)
  plgpu.barrier_wait(bar)


def block_scores(logits, index_logits, lse2, w, scale):
  """p [64] (attention mass per key, before masking) and I [64] of one block from the two wgmma results."""
  s = logits * (scale * LOG2E) - lax.broadcast_in_dim(lse2, logits.shape, [1])
  p = jnp.exp2(s).sum(axis=1)
  scores = (jnp.maximum(index_logits, 0.0) * lax.broadcast_in_dim(w, index_logits.shape, [1])).sum(axis=1)
  return p, scores


def read_index_block(idx_smem, idx_ready, idx_free, n, release=True):
  """The validity of block n's keys, bool [64] in the wgmma row layout; with `release`, frees the index
  buffer (otherwise the caller does, after a commit_smem)."""
  ps = lax.rem(n, 2)
  plgpu.barrier_wait(idx_ready.at[ps])
  idx = plgpu.load(idx_smem.at[ps], (), layout=plgpu.Layout.WGMMA.reduce(1))
  if release:
    plgpu.commit_smem()  # order these reads before the TMA that refills the buffer (async proxy)
    plgpu.barrier_arrive(idx_free.at[ps])
  return idx >= 0


def _compute(q_ref, iq_ref, lse_ref, w_ref, out_ref, q_smem, iq_smem, lse_smem, w_smem, ring, idx_smem, out_smem,
             q_bar, ready, free, idx_ready, idx_free, *, scale, stages, blocks):
  b, t = lax.axis_index("b"), lax.axis_index("t")
  load_queries(q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, q_bar)
  cols = plgpu.Layout.WGMMA.reduce(0)
  lse2 = plgpu.load(lse_smem, (), layout=cols) * LOG2E
  w = plgpu.load(w_smem, (), layout=cols)
  n_chunks = q_smem.shape[0]
  per_block = n_chunks + iq_smem.shape[0]
  matmul = functools.partial(ring_matmul, ring, ready, free, stages=stages)

  def block(n, stats):
    m, l, z, a, c = stats
    logits = matmul(n * per_block, q_smem)
    index_logits = matmul(n * per_block + n_chunks, iq_smem)
    keep = read_index_block(idx_smem, idx_ready, idx_free, n)
    p, scores = block_scores(logits, index_logits, lse2, w, scale)
    p = jnp.where(keep, p, 0.0)
    scores = jnp.where(keep, scores, _FLOOR)
    m_new = jnp.maximum(m, scores)
    l = l * jnp.exp2((m - m_new) * LOG2E) + jnp.where(keep, jnp.exp2((scores - m_new) * LOG2E), 0.0)
    z = z + p
    a = a + p * jnp.where(keep, scores, 0.0)
    c = c + jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return m_new, l, z, a, c

  vec = lambda v: plgpu.layout_cast(jnp.full((BLOCK_S,), v, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  stats = lax.fori_loop(0, blocks, block, (vec(_FLOOR), vec(0.0), vec(0.0), vec(0.0), vec(0.0)))
  for k, v in enumerate(stats):
    out_smem.at[k][...] = v
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, t])
  plgpu.wait_smem_to_gmem(0)


def _body(sel_ref, q_ref, k_ref, lse_ref, iq_ref, ik_ref, w_ref, out_ref, q_smem, iq_smem, lse_smem, w_smem, ring,
          idx_smem, out_smem, q_bar, ready, free, idx_ready, idx_free, *, scale, stages):
  wg = lax.axis_index("wg")

  @pl.when(wg == 0)
  def _():
    plgpu.set_max_registers(232, action="increase")
    _compute(q_ref, iq_ref, lse_ref, w_ref, out_ref, q_smem, iq_smem, lse_smem, w_smem, tuple(ring), idx_smem,
             out_smem, q_bar, ready, free, idx_ready, idx_free, scale=scale, stages=stages,
             blocks=sel_ref.shape[-1] // BLOCK_S)

  @pl.when(wg == 1)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    gather(sel_ref, k_ref, ik_ref, tuple(ring), idx_smem, ready, free, idx_ready, idx_free,
           n_chunks=q_smem.shape[0], i_chunks=iq_smem.shape[0], stages=stages)


def compiler_params() -> plgpu.CompilerParams:
  # No automatic warpgroup barriers: each 64-key block issues 704 row copies, and every SMEM region here
  # is written and read by the same threads or ordered by commit_smem (sparse_mla measured 2.5x).
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0, unsafe_no_auto_barriers=True)


def sparse_stats(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, selected, *,
                 config: Config = Config(), interpret=False) -> jax.Array:
  """Per-lane statistics float32 [B, T, 5, 64] of the sparse KL (reduce them with `kernel_dense.combine`).

  attn_q [B, T, N, C], attn_k [B, S, C], attn_lse [B, T, N], idx_q [B, T, I, H], idx_k [B, S, H],
  idx_w [B, T, I]; `selected` [B, T, K_pad] from `selected_keys`.
  """
  bsz, t, n, c = attn_q.shape
  i, h = idx_q.shape[2:]
  if not supports(n, c, i, h):
    raise ValueError(f"Unsupported sizes: heads {n} x {c}, index heads {i} x {h} (heads padded to a multiple of "
                     f"{HEAD_MULTIPLE} must be <= {MAX_HEADS}, index heads <= {INDEX_HEADS}, and the queries must "
                     "leave SMEM for >= 2 ring slots).")
  n_p, c_p, i_p, h_p = padded_dims(n, c, i, h)
  stages = forward_stages(n_p, c_p, i_p, h_p, config)
  q, k, lse, iq, ik, w = padded_operands(attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w)
  smem = functools.partial(plgpu.SMEM, dtype=jnp.bfloat16, transforms=TRANSFORMS)
  return plgpu.kernel(
      functools.partial(_body, scale=float(attn_scale), stages=stages),
      out_type=jax.ShapeDtypeStruct((bsz, t, NUM_STATS, BLOCK_S), jnp.float32),
      scratch_types=(
          smem((c_p // CHUNK, n_p, CHUNK)),
          smem((h_p // CHUNK, i_p, CHUNK)),
          plgpu.SMEM((n_p,), jnp.float32),
          plgpu.SMEM((i_p,), jnp.float32),
          ring_buffer(stages, bool(interpret)),
          plgpu.SMEM((2, BLOCK_S), jnp.int32),
          plgpu.SMEM((NUM_STATS, BLOCK_S), jnp.float32),
          plgpu.Barrier(num_arrivals=c_p // CHUNK + h_p // CHUNK + 2),
          plgpu.Barrier(num_arrivals=BLOCK_S, num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
      ),
      # Mosaic GPU launches the grid reversed (last axis -> CUDA x, which is not capped at 65535 blocks).
      grid=(bsz, t),
      grid_names=("b", "t"),
      num_threads=2,
      thread_name="wg",
      compiler_params=compiler_params(),
      interpret=interpret,
  )(selected, q, k, lse, iq, ik, w)
