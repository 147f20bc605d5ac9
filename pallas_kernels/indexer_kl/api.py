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
  * "xla": the chunked XLA computations of `chunked.py`, differentiated by JAX.
  * "pallas": the Mosaic GPU kernels, under a custom_vjp whose residuals are the forward's logsumexp(I) and
    z = sum p per token. Dense: forward statistics `kernel_dense`, backward `kernel_dense_bwd` (d idx_k by
    atomic TMA reduce-add, so its rounding varies run to run) or, with `deterministic=True`, the bitwise
    reproducible `chunked.dense_kl_grads`. Sparse: `kernel_sparse` and `kernel_sparse_bwd` (indices within a
    row must be distinct, as top-k gives them; d idx_k atomic as well). Both compute in bf16 with float32
    accumulation and need a static (Python float) attn_scale. `interpret=True` runs them in GPU interpret mode
    with race detection (CPU tests).
None picks "pallas" on the GPU for bf16 inputs of sizes the kernels fit and, for the sparse loss, at most
SPARSE_KERNEL_MAX_KEYS keys. Today's figures (H200, benchmarks/indexer_kl.md): dense forward + backward about
5.6x the "xla" one at T = 8K; sparse forward + backward about 1.15x over 8K keys.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.indexer_kl import chunked, kernel_dense, kernel_dense_bwd, kernel_sparse, kernel_sparse_bwd
from pallas_kernels.indexer_kl.per_token_cta import interpret_params

AVAILABLE = ("xla", "pallas")
# The sparse kernels are the automatic choice over at most this many keys: over 32K+ keys their d idx_k
# reduce-adds miss L2 and forward + backward is slower than "xla" (docs/kernel_notes.md).
SPARSE_KERNEL_MAX_KEYS = 16384
_VISIBILITY = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")


def _kernel_supports(attn_q: jax.Array, idx_q: jax.Array) -> bool:
  """Automatic choice of the dense kernel: bf16 inputs (it computes in bf16) and sizes that fit its SMEM."""
  return attn_q.dtype == idx_q.dtype == jnp.bfloat16 and kernel_dense.supports(*attn_q.shape[2:], *idx_q.shape[2:])


def _sparse_kernel_supports(attn_q: jax.Array, idx_q: jax.Array, num_keys: int) -> bool:
  """Automatic choice of the sparse kernels: bf16 inputs, sizes that fit the forward's and backward's SMEM, and
  at most SPARSE_KERNEL_MAX_KEYS keys."""
  sizes = (*attn_q.shape[2:], *idx_q.shape[2:])
  return (attn_q.dtype == idx_q.dtype == jnp.bfloat16 and num_keys <= SPARSE_KERNEL_MAX_KEYS
          and kernel_sparse.supports(*sizes) and kernel_sparse_bwd.supports(*sizes))


def _kl_and_residuals(partials):
  """Per-lane statistics [B, T, 5, 64] -> (KL [B, T], (logsumexp(I), z) for the backward)."""
  m, l, z, a, c = kernel_dense.combine(partials)
  kl, lse_scores = kernel_dense.kl_from_stats(m, l, z, a, c)
  return kl, (lse_scores, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _pallas_dense_kl(attn_scale, t_chunk, s_chunk, interpret, deterministic, *args):
  return _pallas_dense_kl_fwd(attn_scale, t_chunk, s_chunk, interpret, deterministic, *args)[0]


def _pallas_dense_kl_fwd(attn_scale, t_chunk, s_chunk, interpret, deterministic, attn_q, attn_k, attn_lse, idx_q,
                         idx_k, idx_w, *visibility):
  del t_chunk, s_chunk, deterministic
  partials = kernel_dense.dense_stats(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w,
                                      **dict(zip(_VISIBILITY, visibility)), interpret=interpret_params(interpret))
  kl, saved = _kl_and_residuals(partials)
  return kl, (attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, visibility, *saved)


def _pallas_dense_kl_bwd(attn_scale, t_chunk, s_chunk, interpret, deterministic, residuals, g):
  attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, visibility, lse_scores, z = residuals
  args = (attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, lse_scores, z, g)
  visibility = dict(zip(_VISIBILITY, visibility))
  if deterministic or not kernel_dense_bwd.supports(*attn_q.shape[2:], *idx_q.shape[2:]):
    grads = chunked.dense_kl_grads(*args, **visibility, t_chunk=t_chunk, s_chunk=s_chunk)
  else:
    grads = kernel_dense_bwd.dense_grads(*args, **visibility, interpret=interpret_params(interpret))
  return (None, None, None, *grads, None, None, None, None)


_pallas_dense_kl.defvjp(_pallas_dense_kl_fwd, _pallas_dense_kl_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pallas_sparse_kl(attn_scale, interpret, *args):
  return _pallas_sparse_kl_fwd(attn_scale, interpret, *args)[0]


def _pallas_sparse_kl_fwd(attn_scale, interpret, attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected):
  partials = kernel_sparse.sparse_stats(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, selected,
                                        interpret=interpret_params(interpret))
  kl, saved = _kl_and_residuals(partials)
  return kl, (attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected, *saved)


def _pallas_sparse_kl_bwd(attn_scale, interpret, residuals, g):
  attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected, lse_scores, z = residuals
  grads = kernel_sparse_bwd.sparse_grads(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, selected,
                                         lse_scores, z, g, interpret=interpret_params(interpret))
  return (None, None, None, *grads, None)


_pallas_sparse_kl.defvjp(_pallas_sparse_kl_fwd, _pallas_sparse_kl_bwd)


def dense_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, *, q_positions, kv_positions,
             q_segment_ids, kv_segment_ids, t_chunk: int = 256, s_chunk: int = 1024,
             implementation: str | None = None, interpret: bool = False,
             deterministic: bool = False) -> jax.Array:
  """Dense warm-up KL(p[t, :] || softmax(I[t, :])) per query, float32 [B, T].

  t_chunk / s_chunk size the XLA loops (the forward of "xla", the deterministic backward of "pallas");
  `deterministic=True` gives "pallas" the XLA backward, bitwise reproducible and slower, instead of the backward
  kernel.
  """
  attn_q, attn_k, attn_lse = jax.tree.map(jax.lax.stop_gradient, (attn_q, attn_k, attn_lse))
  visibility = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids)
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(attn_q, idx_q)) == "pallas":
    t_chunk, s_chunk = min(t_chunk, attn_q.shape[1]), min(s_chunk, attn_k.shape[1])
    return _pallas_dense_kl(float(attn_scale), t_chunk, s_chunk, interpret, deterministic, attn_q, attn_k,
                            attn_lse, idx_q, idx_k, idx_w, *(visibility[name] for name in _VISIBILITY))
  return chunked.dense_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, **visibility, t_chunk=t_chunk,
                          s_chunk=s_chunk)


def sparse_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, indices, *, q_positions,
              kv_positions, q_segment_ids, kv_segment_ids, t_chunk: int = 64,
              implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """Sparse-stage KL(p[t, S_t] || softmax(I[t, S_t])) per query over `indices` [B, T, K], float32 [B, T].

  t_chunk sizes the "xla" loop.
  """
  attn_q, attn_k, attn_lse = jax.tree.map(jax.lax.stop_gradient, (attn_q, attn_k, attn_lse))
  visibility = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids)
  supported = _sparse_kernel_supports(attn_q, idx_q, attn_k.shape[1])
  if resolve_implementation(implementation, AVAILABLE, supported) == "pallas":
    selected = kernel_sparse.selected_keys(indices, **visibility)
    return _pallas_sparse_kl(float(attn_scale), interpret, attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected)
  return chunked.sparse_kl(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, indices, **visibility,
                           t_chunk=t_chunk)
