"""Backward of the sparse-stage indexer KL on Hopper with Pallas Mosaic GPU: recompute one token's block of
selected keys at a time, d iq and d w in registers, d ik by TMA reduce-add into the selected key rows.

With p̂ = p / z the target and q = softmax(I) over the selected set, d KL[t] / d I[t, s] = q[t, s] - p̂[t, s]
(as in `chunked.dense_kl_grads`). The forward's logsumexp(I) and z give, per selected key s of token t and upstream
gradient g_t, G[s] = g_t exp(I[s] - logsumexp(I)) - (g_t / z_t) p[s], and through
I[s] = sum_j w_j ReLU(iq_j . ik_s), with A[s, j] = G[s] [iq_j . ik_s > 0]:
  V = A^T ik (index heads x H),  d iq = w V,  d w_j = sum_s G[s] ReLU(iq_j . ik_s) = iq_j . V_j,
  d ik_s += sum_j A[s, j] w_j iq_j.
The identity d w_j = iq_j . V_j saves a cross-thread column sum over keys per block.

The CTA layout is the forward's (`kernel_sparse`): wg 1 gathers the selected rows into the same ring, in the
same order; wg 0 recomputes the attention logits [64 keys, N] (p) and the index logits [64 keys, I], keeps the two
index-key ring slots until V += A^T ik has read them, stages A and A w (bf16, 8 KiB each) for the wgmmas,
and per 64-column chunk of d ik stages 64 keys x 64 f32 and adds it into the f32 d ik output with one TMA
reduce-add per selected row (atomic per element: the summation order, hence the rounding, varies run to run),
issued from `kernel_sparse.ROW_COPY_WARPS` warps: a bulk async group belongs to its issuing thread, but the
warpgroup-wide commit and wait run on every thread, each for its own copies. The index heads are the M of the V
product: they are padded to INDEX_HEADS = 64.

SMEM at V3.2 shapes: the query 144 KiB + the index query 16 KiB + A, A w 16 KiB + the d ik stage 16 KiB
leave 3 ring slots of 8 KiB (the stage is single-buffered: a chunk waits until the previous one's row
reductions have read it). At the end the token's d iq goes out through the index query's SMEM and d w
through w's.

GPU interpret mode does not implement TMA reductions: there each staged chunk is copied whole into a
[B, T, K, H] buffer of per-token partials that XLA scatter-adds, so the tests check everything but the
reduce-add TMAs (which the cross-lowering test compiles), and the gather is `kernel_sparse`'s TMA stand-in.
Limits: over 32K+ keys the d ik reduce-adds miss L2 and the pair of kernels is slower than the chunked XLA path
(`api.SPARSE_KERNEL_MAX_KEYS`, benchmarks/indexer_kl.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.dispatch import interpreting
from pallas_kernels.indexer_kl import kernel_dense, kernel_sparse, per_token_cta
from pallas_kernels.indexer_kl.kernel_dense import MAX_HEADS
from pallas_kernels.indexer_kl.kernel_sparse import INDEX_HEADS
from pallas_kernels.indexer_kl.per_token_cta import BLOCK_S, CHUNK, LOG2E
from pallas_kernels.mosaic.row_copies import issue_row_copies


def stages_for(n_p: int, c_p: int, i_p: int, h_p: int) -> int:
  """Ring slots of the backward for padded sizes."""
  buffers = (2 * c_p * n_p, 2 * h_p * i_p, 4 * n_p, 4 * i_p, 4 * i_p, 4 * 2 * BLOCK_S, 2 * 2 * BLOCK_S * i_p,
             4 * BLOCK_S * CHUNK)
  return per_token_cta.ring_stages(buffers, kernel_dense.MAX_STAGES)


def supports(num_heads: int, key_dim: int, index_heads: int, index_dim: int) -> bool:
  """Whether the backward kernel handles these sizes (checked by `sparse_grads` below)."""
  n, c, i, h = kernel_sparse.padded_dims(num_heads, key_dim, index_heads, index_dim)
  return n <= MAX_HEADS and index_heads <= INDEX_HEADS and stages_for(n, c, i, h) >= 2


def _product(a, b, shape):
  """a @ b (wgmma, fresh float32 accumulator)."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _compute(tok_ref, q_ref, iq_ref, lse_ref, w_ref, diq_ref, dw_ref, dik_ref, q_smem, iq_smem, lse_smem, w_smem,
             ring, idx_smem, a_smem, aw_smem, stage, q_bar, ready, free, idx_ready, idx_free, *, scale, stages, blocks,
             interpret):
  b, t = lax.axis_index("b"), lax.axis_index("t")
  # w goes to two buffers: one SMEM ref is read in one register layout (Mosaic's layout inference found no
  # solution for both), and the second one, read per index head, later stages d w.
  w_smem, w_rows_smem = w_smem
  kernel_sparse.load_queries(q_ref, iq_ref, lse_ref, w_ref, q_smem, iq_smem, lse_smem, w_smem, q_bar, (w_rows_smem,))
  rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  lse2 = plgpu.load(lse_smem, (), layout=cols) * LOG2E
  w = plgpu.load(w_smem, (), layout=cols)
  w_rows = plgpu.load(w_rows_smem, (), layout=rows)
  lse_scores, g, g_over_z = tok_ref[b, t, 0], tok_ref[b, t, 1], tok_ref[b, t, 2]
  n_chunks, h_chunks = q_smem.shape[0], iq_smem.shape[0]
  per_block = n_chunks + h_chunks
  i_p = iq_smem.shape[1]
  slot_of = lambda g: lax.rem(g, jnp.int32(stages))
  matmul = functools.partial(per_token_cta.stream_matmul, ring[0], ready, free, stages)

  def add_rows(n, ps, c, acc):
    """d ik[b, idx[r], chunk c] += acc[r] for the block's valid rows."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's reductions have read the stage
    stage[...] = acc
    plgpu.commit_smem()
    if interpret:  # per-token partials, scatter-added outside
      plgpu.copy_smem_to_gmem(stage, dik_ref.at[b, t, pl.ds(n * BLOCK_S, BLOCK_S), pl.ds(c * CHUNK, CHUNK)])
      return

    def add_row(r, row):  # invalid rows (-1 -> row 0) add their zero rows of acc: harmless
      plgpu.copy_smem_to_gmem(stage.at[pl.ds(r, 1)], dik_ref.at[b, pl.ds(row, 1), pl.ds(c * CHUNK, CHUNK)],
                              commit_group=False, reduction_op="add")

    issue_row_copies(BLOCK_S, kernel_sparse.ROW_COPY_WARPS, lambda r: idx_smem[ps, r], add_row)
    plgpu.commit_smem_to_gmem_group()  # every thread commits (and later awaits) its own bulk group

  def block(n, v):
    g0 = n * per_block
    logits = matmul(g0, q_smem)
    index_logits = matmul(g0 + n_chunks, iq_smem, release=False)
    ps = lax.rem(n, 2)
    keep = kernel_sparse.read_index_block(idx_smem, idx_ready, idx_free, n, release=False)
    p, scores = per_token_cta.attention_mass(logits, lse2, scale), per_token_cta.index_scores(index_logits, w)
    grad_scores = jnp.where(keep, g * jnp.exp2((scores - lse_scores) * LOG2E) - g_over_z * p, 0.0)
    a = jnp.where(index_logits > 0, lax.broadcast_in_dim(grad_scores, index_logits.shape, [0]), 0.0)
    a_smem[...] = a.astype(a_smem.dtype)
    aw_smem[...] = (a * lax.broadcast_in_dim(w, a.shape, [1])).astype(aw_smem.dtype)
    plgpu.commit_smem()
    a_t = a_smem.transpose((1, 0))
    v = tuple(v[c] + _product(a_t, ring[0].at[slot_of(g0 + n_chunks + c)], (i_p, CHUNK)) for c in range(h_chunks))
    for c in range(h_chunks):
      plgpu.barrier_arrive(free.at[slot_of(g0 + n_chunks + c)])
    for c in range(h_chunks):
      add_rows(n, ps, c, _product(aw_smem, iq_smem.at[c], (BLOCK_S, CHUNK)))
    plgpu.barrier_arrive(idx_free.at[ps])  # the row indices are read (commit_smem in add_rows fenced them)
    return v

  zeros = plgpu.layout_cast(jnp.zeros((i_p, CHUNK), jnp.float32), plgpu.Layout.WGMMA)
  v = lax.fori_loop(0, blocks, block, (zeros,) * h_chunks)
  dw = sum((plgpu.load(iq_smem.at[c], (), layout=plgpu.Layout.WGMMA).astype(jnp.float32) * v[c]).sum(axis=1)
           for c in range(h_chunks))
  w_bcast = lax.broadcast_in_dim(w_rows, (i_p, CHUNK), [0])
  plgpu.wait_smem_to_gmem(0)
  for c in range(h_chunks):
    iq_smem.at[c][...] = (v[c] * w_bcast).astype(iq_smem.dtype)
  w_rows_smem[...] = dw
  plgpu.commit_smem()
  for c in range(h_chunks):
    plgpu.copy_smem_to_gmem(iq_smem.at[c], diq_ref.at[b, t, :, pl.ds(c * CHUNK, CHUNK)])
  plgpu.copy_smem_to_gmem(w_rows_smem, dw_ref.at[b, t])
  plgpu.wait_smem_to_gmem(0)


def _body(sel_ref, tok_ref, q_ref, k_ref, lse_ref, iq_ref, ik_ref, w_ref, diq_ref, dw_ref, dik_ref, q_smem, iq_smem,
          lse_smem, w_smem, ring, idx_smem, a_smem, aw_smem, stage, q_bar, ready, free, idx_ready, idx_free, *,
          scale, stages, interpret):
  per_token_cta.split_warpgroups(
      functools.partial(_compute, tok_ref, q_ref, iq_ref, lse_ref, w_ref, diq_ref, dw_ref, dik_ref, q_smem, iq_smem,
                        lse_smem, w_smem, tuple(ring), idx_smem, a_smem, aw_smem, stage, q_bar, ready, free,
                        idx_ready, idx_free, scale=scale, stages=stages, blocks=sel_ref.shape[-1] // BLOCK_S,
                        interpret=interpret),
      functools.partial(kernel_sparse.gather, sel_ref, k_ref, ik_ref, tuple(ring), idx_smem, ready, free, idx_ready,
                        idx_free, n_chunks=q_smem.shape[0], i_chunks=iq_smem.shape[0], stages=stages))


def sparse_grads(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, selected, lse_scores, z, g, *,
                 interpret=False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(d idx_q, d idx_k, d idx_w) of sum_t g[t] KL[t], given the forward's logsumexp(I) and z per token [B, T].

  Shapes as in `kernel_sparse.sparse_stats`; `selected` from `kernel_sparse.selected_keys`.
  """
  bsz, t, n, c = attn_q.shape
  i, h = idx_q.shape[2:]
  if not supports(n, c, i, h):
    raise ValueError(f"Unsupported sizes: heads {n} x {c}, index heads {i} x {h} (the queries must leave SMEM "
                     f"for >= 2 ring slots and index heads be <= {INDEX_HEADS}).")
  n_p, c_p, i_p, h_p = kernel_sparse.padded_dims(n, c, i, h)
  stages = stages_for(n_p, c_p, i_p, h_p)
  q, k, lse, iq, ik, w = kernel_sparse.padded_operands(attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w)
  has_keys = z > 0
  g = jnp.where(has_keys, g.astype(jnp.float32), 0.0)
  tok = jnp.stack([jnp.where(has_keys, lse_scores, 0.0), g, g / jnp.where(has_keys, z, 1.0), jnp.zeros_like(g)],
                  axis=-1)
  q_scratch, iq_scratch, lse_scratch, w_scratch = per_token_cta.query_scratch(n_p, c_p, i_p, h_p)
  interpret_mode = interpreting(interpret)  # no cp.async and no TMA reductions there (module docstring)
  kernel = per_token_cta.launch_per_token(
      functools.partial(_body, scale=float(attn_scale), stages=stages, interpret=interpret_mode),
      (bsz, t),
      out_type=(),
      scratch_types=(
          q_scratch, iq_scratch, lse_scratch, (w_scratch, w_scratch),  # w twice: see `_compute`
          kernel_sparse.ring_buffer(stages, interpret_mode),
          plgpu.SMEM((2, BLOCK_S), jnp.int32),
          per_token_cta.wgmma_smem((BLOCK_S, i_p)),
          per_token_cta.wgmma_smem((BLOCK_S, i_p)),
          plgpu.SMEM((BLOCK_S, CHUNK), jnp.float32),
          *per_token_cta.barriers(c_p // CHUNK + h_p // CHUNK + 3, stages,
                                  ring_arrivals=kernel_sparse.ring_arrivals(interpret_mode)),
      ),
      params=per_token_cta.compiler_params(auto_barriers=kernel_sparse.AUTO_BARRIERS),
      interpret=interpret,
  )

  def run(refs):
    kernel(selected, tok, q, k, lse, iq, ik, w, *refs)

  # The outputs are kernel operands written in place: d ik must start at zero for the reductions.
  dik_shape = (bsz, t, selected.shape[-1], h_p) if interpret_mode else (bsz, attn_k.shape[1], h_p)
  diq, dw, dik = pl.run_state(run)((jnp.zeros(iq.shape, iq.dtype), jnp.zeros(w.shape, jnp.float32),
                                    jnp.zeros(dik_shape, jnp.float32)))
  if interpret_mode:
    rows = jnp.where(selected >= 0, selected, 0)
    dik = jax.vmap(lambda r, x: jnp.zeros((attn_k.shape[1], h_p), jnp.float32).at[r].add(x))(rows, dik)
  return (diq[:, :, :i, :h].astype(idx_q.dtype), dik[:, :, :h].astype(idx_k.dtype),
          dw[:, :, :i].astype(idx_w.dtype))
