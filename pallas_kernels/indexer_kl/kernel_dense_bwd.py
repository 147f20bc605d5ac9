"""Backward of the dense indexer KL on Hopper with Pallas Mosaic GPU: one query token per CTA, streamed keys,
d idx_k by TMA reduce-add.

DeepSeek-V3.2 dense warm-up (arXiv 2512.02556, section 2.1). With the forward's per-token logsumexp(I) and
z = sum p (the custom_vjp residuals) and the upstream cotangent g [B, T], over the visible keys s of token t:
  dI[t, s] = g_t (softmax(I)[t, s] - p[t, s] / z_t),   p[t, s] = sum_h exp(scale q[t, h].k[s] - lse[t, h]),
  dL[t, j, s] = dI[t, s] w[t, j] [L[t, j, s] > 0],      L[t, j, s] = iq[t, j].ik[s],
  d w[t, j] = sum_s dI ReLU(L),  d iq[t, j] = sum_s dL ik[s],  d ik[s] = sum_{t, j} dL iq[t, j].
Same function as `chunked.dense_kl_grads` (the api's `deterministic=True` path).

The CTA is the forward's (`kernel_dense`): its memory warpgroup (`kernel_dense.stream_keys`) streams the
token's visible key tiles of 64 keys through a ring of 64 x 64 bf16 slots, 9 attention-key chunks then
2 index-key chunks per tile. The compute warpgroup per tile:
  1. logits [64 keys, N heads] from the attention chunks (each slot released as soon as its wgmma
     retired), p per key as a row sum; index logits L [64 keys, I] from the index chunks, which it keeps;
  2. in registers: I, dI, d w accumulated as [64 keys, I] (reduced over keys once, at the end), and
     dL [64 keys, I], stored to SMEM in bf16 (the XLA pass also rounds dL to the key dtype);
  3. d iq [I, H] += dL^T ik (wgmma, registers across tiles), then the index chunks are released;
  4. d ik of the tile = dL iq [64 keys, H] in two 64-column slabs, each staged in one f32 SMEM slab and
     added into the f32 d ik output by one TMA reduce-add (atomic per element: the order of the additions,
     hence the rounding, varies run to run; that is why `chunked.dense_kl_grads` stays as the deterministic path).
d iq (through the same f32 slab) and d w (its own 256 bytes) are written once per token at the end.

SMEM at V3.2 shapes (128 heads x 576, 64 index heads x 128, bf16), each buffer aligned to 1 KiB: the
token's query 144 KiB, index query 16 KiB, dL 8 KiB, f32 slab 16 KiB, lse / w / d w / key positions 4 KiB,
2 KiB of cross-warp reduction scratch (d w's sum over keys) and 1 KiB of barriers: 191 KiB, leaving 4 ring
slots of 8 KiB (the forward has 7); the lowering counts 227448 of the 232448 bytes. A second f32 slab
(double-buffered d ik staging) would cost two ring slots. Index heads are padded to exactly 64 (one wgmma M for d iq;
more would not fit the registers beside the d iq accumulators) and the index dim to at most 128.

d ik is a sum over every token that sees the key: T^2/2 x H x 4 bytes of reduce-add traffic (17 GB at
T = 8K), against the attention recompute of T^2/2 x 2 N C flops; neighbouring tokens, running together,
add into the same key tiles, which stay in L2.

GPU interpret mode does not implement TMA reductions: there each token writes its d ik slabs whole into a
[B, T, S, H] buffer of per-token partials that XLA sums, so CPU tests check everything but the reduce-add
TMAs (which the cross-lowering test compiles). Today's figure (T = 128K, V3.2 shapes, H200): about 330 TF/s,
benchmarks/indexer_kl.md.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dispatch import interpreting
from pallas_kernels.indexer_kl import kernel_dense, per_token_cta
from pallas_kernels.indexer_kl.kernel_dense import MAX_HEADS
from pallas_kernels.indexer_kl.per_token_cta import BLOCK_S, CHUNK, LOG2E

INDEX_HEADS = 64  # index heads padded to this: the M of the d iq wgmma
MAX_INDEX_DIM = 128
REDUCTION_SCRATCH_BYTES = 2048  # d w's cross-warp sum over keys, once per token


def stages_for(n: int, c: int, h: int) -> int:
  """Ring slots beside the queries, d L, the f32 slab and the small buffers, for padded sizes."""
  buffers = (2 * c * n, 2 * h * INDEX_HEADS, 4 * n, 4 * INDEX_HEADS, 4 * 2 * 2 * BLOCK_S,
             2 * BLOCK_S * INDEX_HEADS, 4 * INDEX_HEADS * CHUNK, 4 * INDEX_HEADS, REDUCTION_SCRATCH_BYTES)
  return per_token_cta.ring_stages(buffers, kernel_dense.MAX_STAGES)


def supports(num_heads: int, key_dim: int, index_heads: int, index_dim: int) -> bool:
  """Whether the backward kernel handles these sizes (the API falls back to `chunked.dense_kl_grads` otherwise)."""
  n, c, _, h = kernel_dense.padded_dims(num_heads, key_dim, index_heads, index_dim)
  return n <= MAX_HEADS and index_heads <= INDEX_HEADS and h <= MAX_INDEX_DIM and stages_for(n, c, h) >= 2


def _mma(acc, a, b, shape, interpret):
  """acc + a @ b (acc None: zero). GPU interpret mode has no `run_state` over accumulators, so there a
  fresh accumulator is added in registers."""
  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)

  if acc is None or interpret:
    out = pl.run_scoped(lambda acc_ref: (product(acc_ref), acc_ref[...])[1], plgpu.ACC(shape, jnp.float32))
    return out if acc is None else acc + out
  return pl.run_state(product)(plgpu.ACC.init(acc))


def _compute(refs, smem, *, scale, stages, interpret):
  lohi_ref, qvis_ref, tok_ref, q_ref, lse_ref, iq_ref, w_ref, dq_ref, dw_ref, dk_ref = refs
  q_smem, iq_smem, lse_smem, w_smem, ring, pos_smem, dl_smem, slab, dw_smem = smem[:9]
  q_bar, ready, free, pos_ready, pos_free = smem[9:]
  b, t = lax.axis_index("b"), lax.axis_index("t")
  lo, hi = lohi_ref[b, t, 0], lohi_ref[b, t, 1]
  q_pos, q_seg = qvis_ref[b, t, 0], qvis_ref[b, t, 1]
  g, lse_scores, inv_z = tok_ref[b, t, 0], tok_ref[b, t, 1], tok_ref[b, t, 2]
  n_chunks, h_chunks = q_smem.shape[0], iq_smem.shape[0]
  per_tile = n_chunks + h_chunks
  lse2, w = kernel_dense.load_query(b, t, q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, q_bar)
  slot_of = lambda i: lax.rem(i, jnp.int32(stages))

  def stage(value, dst, target=slab, **copy_kw):
    """Writes value through SMEM (the f32 slab) to dst, once the slab's previous TMA has read it."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    target[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(target, dst, **copy_kw)

  def tile(j, carry):
    dq, dw = carry
    n = j - lo
    g0 = n * per_tile
    logits = per_token_cta.stream_matmul(ring, ready, free, stages, g0, q_smem)
    # p before the index logits: [64, N] f32 need not live beside them.
    p = per_token_cta.attention_mass(logits, lse2, scale)
    # The index-key chunks stay in the ring until d iq has read them.
    index = per_token_cta.stream_matmul(ring, ready, free, stages, g0 + n_chunks, iq_smem, release=False)
    index_slots = [slot_of(g0 + n_chunks + k) for k in range(h_chunks)]
    keep = kernel_dense.key_visibility(pos_smem, pos_ready, pos_free, n, q_pos, q_seg)
    w_b = lax.broadcast_in_dim(w, index.shape, [1])
    relu = jnp.maximum(index, 0.0)
    scores = (relu * w_b).sum(axis=1)
    softmax = jnp.exp2((scores - lse_scores) * LOG2E)
    d_i = jnp.where(keep, g * (softmax - p * inv_z), 0.0)
    d_i_b = lax.broadcast_in_dim(d_i, index.shape, [0])
    dw = dw + relu * d_i_b
    dl_smem[...] = jnp.where(index > 0, d_i_b * w_b, 0.0).astype(dl_smem.dtype)
    plgpu.commit_smem()

    dq = [_mma(acc, dl_smem.transpose((1, 0)), ring.at[slot], acc.shape, interpret)
          for acc, slot in zip(dq, index_slots)]
    for slot in index_slots:
      plgpu.barrier_arrive(free.at[slot])
    keys = pl.ds(j * BLOCK_S, BLOCK_S)
    for k in range(h_chunks):
      dk = _mma(None, dl_smem, iq_smem.at[k], (BLOCK_S, CHUNK), interpret)
      columns = pl.ds(k * CHUNK, CHUNK)
      if interpret:  # per-token partials, summed outside
        stage(dk, dk_ref.at[b, t, keys, columns])
      else:
        stage(dk, dk_ref.at[b, keys, columns], reduction_op="add")
    return dq, dw

  zeros = lambda shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
  dq0 = [zeros((INDEX_HEADS, CHUNK)) for _ in range(h_chunks)]
  dq, dw = lax.fori_loop(lo, hi, tile, (dq0, zeros((BLOCK_S, INDEX_HEADS))))
  for k, acc in enumerate(dq):
    stage(acc, dq_ref.at[b, t, :, pl.ds(k * CHUNK, CHUNK)])
  stage(dw.sum(axis=0), dw_ref.at[b, t], dw_smem)
  plgpu.wait_smem_to_gmem(0)


def _body(lohi_ref, qvis_ref, kvvis_ref, tok_ref, q_ref, k_ref, lse_ref, iq_ref, ik_ref, w_ref, dq_ref, dw_ref,
          dk_ref, q_smem, iq_smem, lse_smem, w_smem, ring, pos_smem, dl_smem, slab, dw_smem, q_bar, ready, free,
          pos_ready, pos_free, *, scale, stages, interpret):
  per_token_cta.split_warpgroups(
      functools.partial(_compute, (lohi_ref, qvis_ref, tok_ref, q_ref, lse_ref, iq_ref, w_ref, dq_ref, dw_ref, dk_ref),
                        (q_smem, iq_smem, lse_smem, w_smem, ring, pos_smem, dl_smem, slab, dw_smem, q_bar, ready,
                         free, pos_ready, pos_free), scale=scale, stages=stages, interpret=interpret),
      functools.partial(kernel_dense.stream_keys, lohi_ref, k_ref, ik_ref, kvvis_ref, ring, pos_smem, ready, free,
                        pos_ready, pos_free, n_chunks=q_smem.shape[0], i_chunks=iq_smem.shape[0], stages=stages))


def dense_grads(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, lse_scores, z, g, *, q_positions,
                kv_positions, q_segment_ids, kv_segment_ids, interpret=False):
  """Cotangent g [B, T] of the dense KL -> gradients w.r.t. idx_q, idx_k, idx_w (in their dtypes).

  Arguments as `chunked.dense_kl_grads` (lse_scores, z: the forward's logsumexp(I) and sum of p per token);
  computes in bf16 with float32 accumulation.
  """
  bsz, t, n, c = attn_q.shape
  i, h = idx_q.shape[2:]
  if not supports(n, c, i, h):
    raise ValueError(f"Unsupported sizes: heads {n} x {c}, index heads {i} x {h} (index heads must be <= "
                     f"{INDEX_HEADS}, the index dim <= {MAX_INDEX_DIM}; queries must leave SMEM for >= 2 ring "
                     f"slots).")
  operands = kernel_dense.padded_operands(attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, q_positions,
                                          kv_positions, q_segment_ids, kv_segment_ids, index_heads=INDEX_HEADS)
  lohi, qvis, kvvis, q, k, lse, iq, ik, w = operands
  n_p, c_p, h_p, s_p = q.shape[2], q.shape[3], iq.shape[3], k.shape[1]
  has_keys = z > 0
  inv_z = jnp.where(has_keys, 1.0 / jnp.where(has_keys, z, 1.0), 0.0)
  tok = jnp.stack([jnp.where(has_keys, g.astype(jnp.float32), 0.0), jnp.where(has_keys, lse_scores, 0.0), inv_z],
                  axis=-1)
  stages = stages_for(n_p, c_p, h_p)
  interpret_mode = interpreting(interpret)  # no TMA reductions there: per-token partials, summed below
  kernel = per_token_cta.launch_per_token(
      functools.partial(_body, scale=float(attn_scale), stages=stages, interpret=interpret_mode),
      (bsz, t),
      out_type=(),
      scratch_types=(
          *per_token_cta.query_scratch(n_p, c_p, INDEX_HEADS, h_p),
          per_token_cta.wgmma_smem((stages, BLOCK_S, CHUNK)),
          plgpu.SMEM((2, 2, BLOCK_S), jnp.int32),
          per_token_cta.wgmma_smem((BLOCK_S, INDEX_HEADS)),
          plgpu.SMEM((INDEX_HEADS, CHUNK), jnp.float32),
          plgpu.SMEM((INDEX_HEADS,), jnp.float32),
          *per_token_cta.barriers(c_p // CHUNK + h_p // CHUNK + 2, stages),
      ),
      params=per_token_cta.compiler_params(auto_barriers=True, reduction_scratch_bytes=REDUCTION_SCRATCH_BYTES),
      interpret=interpret,
  )

  def run(refs):
    kernel(lohi, qvis, kvvis, tok, q, k, lse, iq, ik, w, *refs)

  # Written in place: d ik must start at zero for the reductions (d iq, d w of tokens without keys too).
  dk_shape = (bsz, t, s_p, h_p) if interpret_mode else (bsz, s_p, h_p)
  zeros = lambda shape: jnp.zeros(shape, jnp.float32)
  dq, dw, dk = pl.run_state(run)((zeros((bsz, t, INDEX_HEADS, h_p)), zeros((bsz, t, INDEX_HEADS)), zeros(dk_shape)))
  if interpret_mode:
    dk = dk.sum(1)
  s = attn_k.shape[1]
  return (dq[:, :, :i, :h].astype(idx_q.dtype), dk[:, :s, :h].astype(idx_k.dtype), dw[:, :, :i].astype(idx_w.dtype))
