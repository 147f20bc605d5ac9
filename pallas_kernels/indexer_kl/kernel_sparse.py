"""Sparse-stage indexer-KL statistics on Hopper with Pallas Mosaic GPU: one query token per CTA, its selected
keys gathered row by row.

DeepSeek-V3.2 sparse training (arXiv 2512.02556, section 2.1): per query t the loss
KL(p[t, S_t] || softmax(I[t, S_t])) over the selected set S_t = indices[t, :], with
p[t, s] = sum_h exp(scale q[t, h].k[s] - lse[t, h]) (renormalised over S_t) and
I[t, s] = sum_j w[t, j] ReLU(iq[t, j].ik[s]). As in the dense kernel (`kernel_dense`; the statistics update
is `per_token_cta`'s, the lane reduction `kernel_dense.combine`), five running numbers per key lane suffice: the
max m and sum l of I's logsumexp, z = sum p, a = sum p I and c = sum p log p; then
KL = c/z - log z - a/z + m + log l.

One CTA owns one query token and two warpgroups:
  * wg 1 (memory, `gather`) walks the token's selected keys in blocks of BLOCK_S = 64: it copies the index
    block into SMEM and then, per 64-column chunk of the keys (the 576-dim latent key is 9 chunks, the
    128-dim index key 2), gathers the 64 selected rows into a ring slot of 64 keys x 64 columns. Hopper has
    no TMA gather: all 128 threads of wg 1 copy 16-byte pieces with cp.async to their swizzled places
    (`pallas_kernels.mosaic.cp_async_gather`, as the sparse MLA kernels do). GPU interpret mode cannot run
    that inline code, so there each row is one TMA into the tiled view, issued from ROW_COPY_WARPS warps
    (`pallas_kernels.mosaic.row_copies`).
  * wg 0 (compute) holds the token's attention query [N, C] and index query [I, H] in SMEM and per block
    runs the dense kernel's two wgmmas with the keys as M: logits [64 keys, N heads] and index logits
    [64 keys, I heads], so the sums over heads are row reductions inside each warp. It releases each ring
    slot as soon as the wgmma that read it has retired.

SMEM at V3.2 shapes (bf16): the query 144 KiB + the index query 16 KiB + small buffers leave room for 7 ring
slots of 8 KiB (the dense kernel's budget: a whole 88 KiB key block does not fit beside the query).
Each 64-key block costs 11 x 64 row copies of 128 bytes, and issuing them, not the tensor cores, bounds this
kernel. Today's figure (4096 queries, K = 2048, H200): forward about 2x and forward + backward about 1.15x
faster than `chunked.sparse_kl` over 8K keys, but slower over 32K+ keys, hence `api.SPARSE_KERNEL_MAX_KEYS`;
benchmarks/indexer_kl.md.

Validity (causal order, segments, -1 slots) is folded into the index list by `selected_keys` in XLA, so
the kernel only tests idx >= 0 (an invalid slot gathers row 0 and is masked). Indices within a row must
be distinct (top-k output), as for the chunked XLA path. Attention heads are padded to a multiple of 16
(lse = +inf, so p = 0), index heads to INDEX_HEADS (w = 0), key dims to multiples of 64 with zeros.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dispatch import interpreting
from pallas_kernels.indexer_kl import kernel_dense, per_token_cta
from pallas_kernels.indexer_kl.kernel_dense import HEAD_MULTIPLE, MAX_HEADS, NUM_STATS
from pallas_kernels.indexer_kl.per_token_cta import BLOCK_S, CHUNK, FLOOR, LOG2E, round_up
from pallas_kernels.mosaic import cp_async_gather
from pallas_kernels.mosaic.row_copies import issue_row_copies

INDEX_HEADS = 64  # index heads padded to one wgmma M: the backward's d iq product has them as M
ROW_COPY_WARPS = 4  # warps that issue per-row TMA copies (the interpret-mode gather, the backward's reduce-adds)
# No automatic warpgroup barriers (here and in the backward): each 64-key block issues 704 row copies, and every
# SMEM region is written and read by the same threads or ordered by commit_smem.
AUTO_BARRIERS = False


def ring_arrivals(interpret: bool) -> int:
  """Arrivals on a ring slot's ready barrier: one per row TMA (interpret mode), or one per thread after the
  cp.async wait."""
  return BLOCK_S if interpret else 1


def padded_dims(n: int, c: int, i: int, h: int) -> tuple[int, int, int, int]:
  return round_up(n, HEAD_MULTIPLE), round_up(c, CHUNK), INDEX_HEADS, round_up(h, CHUNK)


def forward_stages(n_p: int, c_p: int, i_p: int, h_p: int) -> int:
  """Ring slots of the forward: its fixed buffers are the dense kernel's (the index block takes the place
  of the key positions), so its budget is too."""
  return kernel_dense.stages_for(n_p, c_p, i_p, h_p)


def supports(num_heads: int, key_dim: int, index_heads: int, index_dim: int) -> bool:
  """Whether the forward kernel handles these sizes (checked by `sparse_stats` below)."""
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
  """The ring: (wgmma view [stages, 64 keys, 64 columns], None) in interpret mode, where rows are copied into the
  tiled view directly; else a union with a flat view that `cp_async_gather` writes at swizzled addresses."""
  tiled = per_token_cta.wgmma_smem((stages, BLOCK_S, CHUNK))
  if interpret:
    return tiled, None
  return plgpu.RefUnion(tiled, plgpu.SMEM((stages * BLOCK_S * CHUNK,), jnp.bfloat16))


def publish_lag(stages: int, per_block: int) -> int:
  """Chunks the cp.async gather issues before it publishes the oldest unpublished one: min(stages - 2, per_block).

  At most stages - 2: the backward holds two slots (the index key's chunks) while it waits for the next chunk,
  so publishing must not wait on a slot that a held chunk's release frees. At most per_block (the chunks of
  one block of keys): before the gather refills an index buffer (block n) it waits until the compute
  warpgroup has released block n - 2, which needs all of block n - 2's chunks published; with a longer lag
  they are not, and the kernel deadlocks. That happened on the H200 at the parity model's shapes (6 chunks per
  block, 12 forward slots: lag 10), not at V3.2's (11 chunks per block, lag 5 / 1).
  """
  return max(min(stages - 2, per_block), 0)


def gather(sel_ref, k_ref, ik_ref, ring, idx_smem, ready, free, idx_ready, idx_free, *, n_chunks, i_chunks,
           stages):
  """Memory warpgroup: per block of 64 selected keys the index block, then chunk by chunk the selected rows.

  Ring slot g % stages holds chunk g = block * (n_chunks + i_chunks) + k: the latent key's chunks first,
  then the index key's. idx_smem is double-buffered and released by the compute warpgroup (idx_free).
  Compiled, all 128 threads copy 16-byte pieces (`cp_async_gather`), one commit group per chunk; chunk g is
  published (its copies awaited, a proxy fence, every thread arrives on its ready barrier) once chunk g + lag has
  been issued (`publish_lag`). In interpret mode (`ring` without its flat view) one TMA per row, issued by
  ROW_COPY_WARPS warps (`issue_row_copies`); they all complete on the slot's ready barrier.
  """
  ring, flat = ring
  mode = "tma" if flat is None else "cp_async"
  b, t = lax.axis_index("b"), lax.axis_index("t")
  blocks = sel_ref.shape[-1] // BLOCK_S
  per_block = n_chunks + i_chunks
  slot_of = lambda g: lax.rem(g, jnp.int32(stages))
  lag = publish_lag(stages, per_block)
  total = blocks * per_block

  def publish(g, pending):
    cp_async_gather.wait(pending)
    plgpu.commit_smem()
    plgpu.barrier_arrive(ready.at[slot_of(g)])

  @pl.loop(0, blocks)
  def _block(n):
    ps = lax.rem(n, 2)

    @pl.when(n >= 2)
    def _():
      plgpu.barrier_wait(idx_free.at[ps])

    plgpu.copy_gmem_to_smem(sel_ref.at[b, t, pl.ds(n * BLOCK_S, BLOCK_S)], idx_smem.at[ps], idx_ready.at[ps])
    plgpu.barrier_wait(idx_ready.at[ps])
    for k in range(per_block):
      slot = per_token_cta.acquire_slot(free, n * per_block + k, stages)
      src, col = (k_ref, k) if k < n_chunks else (ik_ref, k - n_chunks)
      if mode == "cp_async":
        g = n * per_block + k
        view = flat.at[pl.ds(slot * BLOCK_S * CHUNK, BLOCK_S * CHUNK)]
        cp_async_gather.issue_block(src.at[b], idx_smem.at[ps], [view], chunks=((col * CHUNK, CHUNK),),
                                    rows=BLOCK_S)

        @pl.when(g >= lag)
        def _():
          publish(g - lag, lag)
        continue

      def copy_row(r, row):
        plgpu.copy_gmem_to_smem(src.at[b, pl.ds(row, 1), pl.ds(col * CHUNK, CHUNK)], ring.at[slot, pl.ds(r, 1)],
                                ready.at[slot])

      issue_row_copies(BLOCK_S, ROW_COPY_WARPS, lambda r: idx_smem[ps, r], copy_row)

    plgpu.commit_smem()  # order this block's index reads before the TMA that refills idx_smem

  if mode == "cp_async":
    for g in range(max(total - lag, 0), total):
      publish(jnp.int32(g), total - 1 - g)

  # Observe the last releases too, so that every barrier phase has been waited on at exit.

  @pl.loop(max(total - stages, 0), total)
  def _drain(g):
    plgpu.barrier_wait(free.at[slot_of(g)])

  @pl.loop(max(blocks - 2, 0), blocks)
  def _drain_idx(n):
    plgpu.barrier_wait(idx_free.at[lax.rem(n, 2)])


def load_queries(q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, bar, w_copies=()):
  """The token's queries, lse and w into SMEM (w also into each of `w_copies`), all on barrier `bar`."""
  b, t = lax.axis_index("b"), lax.axis_index("t")
  copies = [(q_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)], q_smem.at[k]) for k in range(q_smem.shape[0])]
  copies += [(iq_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)], iq_smem.at[k]) for k in range(iq_smem.shape[0])]
  copies += [(lse_ref.at[b, t], lse_smem)] + [(w_ref.at[b, t], dst) for dst in (w_smem, *w_copies)]
  for src, dst in copies:
    plgpu.copy_gmem_to_smem(src, dst, bar)
  plgpu.barrier_wait(bar)


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
  matmul = functools.partial(per_token_cta.stream_matmul, ring[0], ready, free, stages)

  def block(n, stats):
    logits = matmul(n * per_block, q_smem)
    index_logits = matmul(n * per_block + n_chunks, iq_smem)
    keep = read_index_block(idx_smem, idx_ready, idx_free, n)
    p, scores = per_token_cta.attention_mass(logits, lse2, scale), per_token_cta.index_scores(index_logits, w)
    return per_token_cta.update_stats(stats, jnp.where(keep, p, 0.0), jnp.where(keep, scores, FLOOR), keep)

  stats = lax.fori_loop(0, blocks, block, per_token_cta.initial_stats())
  per_token_cta.write_stats(stats, out_smem, out_ref, b, t)


def _body(sel_ref, q_ref, k_ref, lse_ref, iq_ref, ik_ref, w_ref, out_ref, q_smem, iq_smem, lse_smem, w_smem, ring,
          idx_smem, out_smem, q_bar, ready, free, idx_ready, idx_free, *, scale, stages):
  per_token_cta.split_warpgroups(
      functools.partial(_compute, q_ref, iq_ref, lse_ref, w_ref, out_ref, q_smem, iq_smem, lse_smem, w_smem,
                        tuple(ring), idx_smem, out_smem, q_bar, ready, free, idx_ready, idx_free, scale=scale,
                        stages=stages, blocks=sel_ref.shape[-1] // BLOCK_S),
      functools.partial(gather, sel_ref, k_ref, ik_ref, tuple(ring), idx_smem, ready, free, idx_ready, idx_free,
                        n_chunks=q_smem.shape[0], i_chunks=iq_smem.shape[0], stages=stages))


def sparse_stats(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, selected, *,
                 interpret=False) -> jax.Array:
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
  stages = forward_stages(n_p, c_p, i_p, h_p)
  interpret_mode = interpreting(interpret)
  q, k, lse, iq, ik, w = padded_operands(attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w)
  return per_token_cta.launch_per_token(
      functools.partial(_body, scale=float(attn_scale), stages=stages),
      (bsz, t),
      out_type=jax.ShapeDtypeStruct((bsz, t, NUM_STATS, BLOCK_S), jnp.float32),
      scratch_types=(
          *per_token_cta.query_scratch(n_p, c_p, i_p, h_p),
          ring_buffer(stages, interpret_mode),
          plgpu.SMEM((2, BLOCK_S), jnp.int32),
          plgpu.SMEM((NUM_STATS, BLOCK_S), jnp.float32),
          *per_token_cta.barriers(c_p // CHUNK + h_p // CHUNK + 2, stages,
                                  ring_arrivals=ring_arrivals(interpret_mode)),
      ),
      params=per_token_cta.compiler_params(auto_barriers=AUTO_BARRIERS),
      interpret=interpret,
  )(selected, q, k, lse, iq, ik, w)
