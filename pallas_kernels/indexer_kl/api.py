"""Indexer KL losses (DeepSeek-V3.2 paper section 2.1) without materialising [T, S] or [N, T, S].

    dense_kl(attn_q [B, T, N, C], attn_k [B, S, C], attn_lse [B, T, N], attn_scale,
             idx_q [B, T, I, H], idx_k [B, S, H], idx_w [B, T, I],
             *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, t_chunk, s_chunk) -> KL [B, T]
    sparse_kl(... same ..., indices [B, T, K], *, ..., t_chunk) -> KL [B, T]

attn_q / attn_k are the main attention's scaled-dot-product operands in MQA form (absorbed query, the
576-dim latent key [c | k_rope] shared by all heads), attn_lse its natural-log logsumexp of
attn_scale * q.k per head. They are a stop-gradient target: gradients reach only idx_q, idx_k, idx_w
(spec section 2: the indexer learns only from its KL). Semantics are `reference.py`'s.

Implementations:
  * "xla": a loop over query chunks; the dense loss folds key chunks with an online logsumexp of the
    indexer scores and running sums of the target mass z = sum p, a = sum p I and c = sum p log p, so
    KL = c/z - log z - a/z + logsumexp(I). Each chunk is `jax.checkpoint`ed, so the backward pass
    recomputes a chunk instead of storing it: memory is O(t_chunk * N * s_chunk) plus O(T * S / s_chunk)
    floats of loop carries.
  * "pallas", dense: the same five statistics from the Mosaic GPU kernel `kernel_dense` (one token per
    CTA, keys streamed, masked tiles skipped; measured on the H200), under a custom_vjp whose backward,
    from the saved logsumexp(I) and z, is the Mosaic GPU kernel `kernel_dense_bwd` (the default; same CTA
    shape; d idx_k by atomic TMA reduce-add, so its rounding varies run to run) or, with
    `deterministic=True`, the chunked XLA pass of `dense_bwd` (visible chunk pairs only; bitwise
    reproducible). H200, T = 8K: backward 20.9 ms (kernel) vs 47.1 ms (XLA), forward + backward 30.8 ms vs
    171 ms for the "xla" implementation; kernel gradients within 2.3e-3 (max-abs relative) of the XLA ones.
    It needs a static (Python float) attn_scale and computes in bf16.
  * "pallas", sparse: the Mosaic GPU forward and backward kernels of `sparse_pallas` (cp.async gather of the
    selected keys; the automatic choice on the GPU for bf16 inputs whose sizes fit). H200, 4096 queries,
    K = 2048 (2026-11-29, session 5): forward 8.7 ms vs 16.9 ms for "xla", forward + backward 20.3 vs 23.6 ms;
    gradient errors against float32 inputs 2.6e-3 / 3.0e-3 / 4.1e-4 (d idx_q / d idx_k / d w), "xla"'s
    2.5e-3 / 3.4e-3 / 4.5e-7. d idx_k is added atomically, so its rounding varies run to run. Over 32K+ keys
    forward + backward is 4-7% slower than "xla" (session 8), so the automatic choice stops at
    SPARSE_KERNEL_MAX_KEYS.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import PAD_POSITION, pad_chunks, unchunk
from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.indexer_kl import dense_bwd, kernel_dense, kernel_dense_bwd, reference
from pallas_kernels.indexer_kl import kernel_sparse, kernel_sparse_bwd, sparse_pallas
from pallas_kernels.indexer_kl.streaming import interpret_params

AVAILABLE = ("xla", "pallas")
SPARSE_AVAILABLE = ("xla", "pallas")


def _chunk_scores(q_chunk, k_chunk, attn_scale, idx_q, idx_k, idx_w):
  """Attention logits [B, t, N, s] and indexer scores [B, t, s] of one (query, key) chunk pair."""
  attn_logits = jnp.einsum("btnc,bsc->btns", q_chunk, k_chunk, preferred_element_type=jnp.float32) * attn_scale
  logits = jnp.einsum("btih,bsh->btis", idx_q, idx_k, preferred_element_type=jnp.float32)
  return attn_logits, jnp.einsum("btis,bti->bts", jax.nn.relu(logits), idx_w.astype(jnp.float32))


def _dense_query_chunk(args, *, attn_scale, kv_chunks):
  attn_q, attn_lse, idx_q, idx_w, q_pos, q_seg = args
  batch, rows = q_pos.shape

  @jax.checkpoint
  def fold(carry, kv):
    m, l, z, a, c = carry
    attn_k, idx_k, kv_pos, kv_seg = kv
    attn_logits, scores = _chunk_scores(attn_q, attn_k, attn_scale, idx_q, idx_k, idx_w)
    keep = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])
    probs = jnp.where(keep, jnp.exp(attn_logits - attn_lse[..., None]).sum(axis=2), 0.0)
    m_new = jnp.maximum(m, jnp.where(keep, scores, -jnp.inf).max(axis=-1))
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    l = l * jnp.exp(jnp.where(jnp.isfinite(m), m - m_ref, -jnp.inf)) + jnp.where(
        keep, jnp.exp(jnp.where(keep, scores, 0.0) - m_ref[..., None]), 0.0).sum(axis=-1)
    log_probs = jnp.log(jnp.where(probs > 0, probs, 1.0))
    z = z + probs.sum(axis=-1)
    a = a + jnp.where(keep, probs * scores, 0.0).sum(axis=-1)
    c = c + (probs * log_probs).sum(axis=-1)
    return (m_new, l, z, a, c), None

  zeros = jnp.zeros((batch, rows), jnp.float32)
  (m, l, z, a, c), _ = jax.lax.scan(fold, (jnp.full_like(zeros, -jnp.inf), zeros, zeros, zeros, zeros), kv_chunks)
  has_keys = z > 0
  z_safe = jnp.where(has_keys, z, 1.0)
  lse_scores = jnp.where(has_keys, m, 0.0) + jnp.log(jnp.where(has_keys, l, 1.0))
  return jnp.where(has_keys, c / z_safe - jnp.log(z_safe) - a / z_safe + lse_scores, 0.0)


def _kernel_supports(attn_q: jax.Array, idx_q: jax.Array) -> bool:
  """Automatic choice of the kernel: bf16 inputs (it computes in bf16) and sizes that fit its SMEM."""
  n, c = attn_q.shape[2:]
  i, h = idx_q.shape[2:]
  return attn_q.dtype == idx_q.dtype == jnp.bfloat16 and kernel_dense.supports(n, c, i, h)


# The sparse kernels are the automatic choice over at most this many keys. On the H200 (4096 queries, K = 2048,
# forward + backward) they took 0.86x XLA's time over 8K keys but 1.04x / 1.07x / 1.05x over 32K / 64K / 128K
# (sessions 7-8): their d idx_k reduce-adds miss L2 once idx_k's rows are spread that wide. 16K, between the two
# measured sides, is not measured.
SPARSE_KERNEL_MAX_KEYS = 16384


def _sparse_kernel_supports(attn_q: jax.Array, idx_q: jax.Array, num_keys: int) -> bool:
  """Automatic choice of the sparse kernels: bf16 inputs, sizes that fit the forward's and backward's SMEM, and
  at most SPARSE_KERNEL_MAX_KEYS keys."""
  sizes = (*attn_q.shape[2:], *idx_q.shape[2:])
  return (attn_q.dtype == idx_q.dtype == jnp.bfloat16 and num_keys <= SPARSE_KERNEL_MAX_KEYS
          and kernel_sparse.supports(*sizes) and kernel_sparse_bwd.supports(*sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _pallas_dense_kl(attn_scale, t_chunk, s_chunk, interpret, deterministic, *args):
  return _pallas_dense_kl_fwd(attn_scale, t_chunk, s_chunk, interpret, deterministic, *args)[0]


def _pallas_dense_kl_fwd(attn_scale, t_chunk, s_chunk, interpret, deterministic, attn_q, attn_k, attn_lse, idx_q,
                         idx_k, idx_w, *visibility):
  del t_chunk, s_chunk, deterministic
  names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")
  partials = kernel_dense.dense_stats(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w,
                                      **dict(zip(names, visibility)), interpret=interpret_params(interpret))
  m, l, z, a, c = kernel_dense.combine(partials)
  kl, lse_scores = kernel_dense.kl_from_stats(m, l, z, a, c)
  return kl, (attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, visibility, lse_scores, z)


def _pallas_dense_kl_bwd(attn_scale, t_chunk, s_chunk, interpret, deterministic, residuals, g):
  attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, visibility, lse_scores, z = residuals
  names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")
  args = (attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, lse_scores, z, g)
  if deterministic or not kernel_dense_bwd.supports(*attn_q.shape[2:], *idx_q.shape[2:]):
    grads = dense_bwd.dense_kl_grads(*args, **dict(zip(names, visibility)), t_chunk=t_chunk, s_chunk=s_chunk)
  else:
    grads = kernel_dense_bwd.dense_grads(*args, **dict(zip(names, visibility)),
                                         interpret=interpret_params(interpret))
  return (None, None, None, *grads, None, None, None, None)


_pallas_dense_kl.defvjp(_pallas_dense_kl_fwd, _pallas_dense_kl_bwd)


def dense_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, *, q_positions, kv_positions,
             q_segment_ids, kv_segment_ids, t_chunk: int = 256, s_chunk: int = 1024,
             implementation: str | None = None, interpret: bool = False,
             deterministic: bool = False) -> jax.Array:
  """Dense warm-up KL(p[t, :] || softmax(I[t, :])) per query, float32 [B, T].

  t_chunk / s_chunk size the XLA loops (the forward of "xla", the XLA backward of "pallas"); `interpret` runs
  the Pallas kernels in GPU interpret mode with race detection (CPU tests); `deterministic=True` gives
  "pallas" the XLA backward, whose gradients are bitwise reproducible (2.3x slower on the H200 at T = 8K)
  instead of the backward kernel.
  """
  attn_q, attn_k, attn_lse = jax.tree.map(jax.lax.stop_gradient, (attn_q, attn_k, attn_lse))
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(attn_q, idx_q)) == "pallas":
    t_chunk, s_chunk = min(t_chunk, attn_q.shape[1]), min(s_chunk, attn_k.shape[1])
    return _pallas_dense_kl(float(attn_scale), t_chunk, s_chunk, interpret, deterministic, attn_q, attn_k,
                            attn_lse, idx_q, idx_k, idx_w, q_positions, kv_positions, q_segment_ids,
                            kv_segment_ids)
  T = attn_q.shape[1]  # noqa: N806
  t_chunk, s_chunk = min(t_chunk, T), min(s_chunk, attn_k.shape[1])
  kv_chunks = (pad_chunks(attn_k, s_chunk), pad_chunks(idx_k, s_chunk),
               pad_chunks(kv_positions, s_chunk, PAD_POSITION), pad_chunks(kv_segment_ids, s_chunk))
  q_chunks = tuple(pad_chunks(x, t_chunk) for x in (attn_q, attn_lse, idx_q, idx_w, q_positions, q_segment_ids))
  kl = jax.lax.map(functools.partial(_dense_query_chunk, attn_scale=attn_scale, kv_chunks=kv_chunks), q_chunks)
  return unchunk(kl, T)


def sparse_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, indices, *, q_positions,
              kv_positions, q_segment_ids, kv_segment_ids, t_chunk: int = 64,
              implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """Sparse-stage KL(p[t, S_t] || softmax(I[t, S_t])) per query over `indices` [B, T, K], float32 [B, T].

  "pallas": the Mosaic GPU kernels of `sparse_pallas` (forward and backward; indices within a row must be
  distinct, as top-k gives them), the automatic choice on the GPU for bf16 inputs of sizes they fit, over at
  most SPARSE_KERNEL_MAX_KEYS keys (where they were faster than "xla" on the H200); t_chunk sizes the "xla" loop;
  `interpret` runs the kernels in GPU interpret mode with race detection (CPU tests).
  """
  attn_q, attn_k, attn_lse = jax.tree.map(jax.lax.stop_gradient, (attn_q, attn_k, attn_lse))
  supported = _sparse_kernel_supports(attn_q, idx_q, attn_k.shape[1])
  if resolve_implementation(implementation, SPARSE_AVAILABLE, supported) == "pallas":
    return sparse_pallas.sparse_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, indices,
                                   q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, interpret=interpret)
  T = attn_q.shape[1]  # noqa: N806
  take = jax.vmap(lambda x, i: x[i])  # per batch: [S, ...][t, K] -> [t, K, ...]
  # Gathered from a float32 copy (and cast back, so the forward is unchanged): the backward of the gather
  # is a scatter-add of every selecting query's term into the key's row, and in bf16 that rounded once per
  # term (~1400 per key at T = 8K, K = 2048): a 8e-2 relative error in d idx_k on the H200.
  idx_k32 = idx_k.astype(jnp.float32)

  @jax.checkpoint
  def query_chunk(args):
    q_chunk, lse_chunk, idx_q_chunk, idx_w_chunk, q_pos, q_seg, sel = args
    safe = jnp.where(sel >= 0, sel, 0)
    keep = (sel >= 0) & (take(kv_positions, safe) <= q_pos[..., None]) & (take(kv_segment_ids, safe) == q_seg[..., None])
    attn_logits = jnp.einsum("btnc,btkc->btnk", q_chunk, take(attn_k, safe),
                             preferred_element_type=jnp.float32) * attn_scale
    logits = jnp.einsum("btih,btkh->btik", idx_q_chunk, take(idx_k32, safe).astype(idx_k.dtype),
                        preferred_element_type=jnp.float32)
    scores = jnp.einsum("btik,bti->btk", jax.nn.relu(logits), idx_w_chunk.astype(jnp.float32))
    return reference.kl_from_scores(attn_logits, lse_chunk, scores, keep)

  t_chunk = min(t_chunk, T)
  chunks = tuple(pad_chunks(x, t_chunk) for x in (attn_q, attn_lse, idx_q, idx_w, q_positions, q_segment_ids,
                                                    indices))
  return unchunk(jax.lax.map(query_chunk, chunks), T)
