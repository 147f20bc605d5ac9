"""The sparse-stage indexer KL through the Mosaic GPU kernels, under a custom_vjp (`api.sparse_kl`'s "pallas").

Forward: `kernel_sparse` (per-lane statistics of each token's selected keys, reduced by
`kernel_dense.combine`), KL = c/z - log z - a/z + logsumexp(I) (`kernel_dense.kl_from_stats`). Backward: `kernel_sparse_bwd`, which
recomputes p and I per selected block from the saved logsumexp(I) and z and writes d idx_q, d idx_w and
(atomically) d idx_k. Both compute in bf16 with float32 accumulation and need a static attn_scale, and
both take `sparse_kl`'s `kernel_sparse.Config` (the default one from `api.sparse_kl`), which sets the
gather and the warps that issue the copies. GPU interpret mode cannot run the cp.async gather (inline Mosaic
GPU code): there the TMA gather stands in.
"""

import dataclasses
import functools

import jax

from pallas_kernels.dispatch import interpreting
from pallas_kernels.indexer_kl import kernel_dense, kernel_sparse, kernel_sparse_bwd
from pallas_kernels.indexer_kl.streaming import interpret_params


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sparse_kl(attn_scale, interpret, config, *args):
  return _sparse_kl_fwd(attn_scale, interpret, config, *args)[0]


def _sparse_kl_fwd(attn_scale, interpret, config, attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected):
  partials = kernel_sparse.sparse_stats(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, selected,
                                        config=config, interpret=interpret_params(interpret))
  m, l, z, a, c = kernel_dense.combine(partials)
  kl, lse_scores = kernel_dense.kl_from_stats(m, l, z, a, c)
  return kl, (attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected, lse_scores, z)


def _sparse_kl_bwd(attn_scale, interpret, config, residuals, g):
  attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected, lse_scores, z = residuals
  grads = kernel_sparse_bwd.sparse_grads(attn_q, attn_k, attn_lse, attn_scale, idx_q, idx_k, idx_w, selected,
                                         lse_scores, z, g, config=config, interpret=interpret_params(interpret))
  return (None, None, None, *grads, None)


_sparse_kl.defvjp(_sparse_kl_fwd, _sparse_kl_bwd)


def sparse_kl(attn_q, attn_k, attn_lse, attn_scale: float, idx_q, idx_k, idx_w, indices, *, q_positions,
              kv_positions, q_segment_ids, kv_segment_ids, interpret: bool = False,
              config: kernel_sparse.Config = kernel_sparse.Config()) -> jax.Array:
  """KL per query float32 [B, T]; arguments as `api.sparse_kl` (attn_* already stop-gradient), plus the
  kernels' `config` (the benchmark and tests pick gather_warps through it)."""
  if interpreting(interpret) and config.gather == "cp_async":
    config = dataclasses.replace(config, gather="tma")
  selected = kernel_sparse.selected_keys(indices, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  return _sparse_kl(float(attn_scale), interpret, config, attn_q, attn_k, attn_lse, idx_q, idx_k, idx_w, selected)
