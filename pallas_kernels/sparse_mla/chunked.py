"""Sparse MLA on the XLA path, a block of query rows at a time (`api.sparse_mla`, "xla").

`reference.sparse_mla` differentiated by JAX holds the gathered rows [B, T, K, Dk] and the probabilities
[B, T, N, K] of every query at once (at V3.2 shapes, T = 128K, K = 2048, Dk = 576 in bf16, 309 GB for the
gathered rows alone). Here the forward maps the reference over blocks of `rows_per_block` queries (each query row
goes through the reference's own operations, so out and lse are bitwise the reference's), and a custom_vjp runs
the backward as `chunked_bwd.sparse_mla_bwd` over blocks of the same size (probabilities recomputed from the
saved logsumexp, dkv accumulated in float32). Temporaries are O(rows_per_block x K x (Dk + N)); the residuals
are q, kv, indices, out and lse. The gradients match the reference's up to float rounding (dkv sums in another
order, and in float32 where the reference adds in kv's dtype).
"""

import functools

import jax

from pallas_kernels.chunking import pad_chunks, unchunk
from pallas_kernels.sparse_mla import chunked_bwd, reference

BLOCK_BYTES = 2**28  # the default block's estimated temporaries (`default_rows_per_block`) stay under this


def default_rows_per_block(q: jax.Array, kv: jax.Array, indices: jax.Array) -> int:
  """The most query rows whose backward temporaries fit in BLOCK_BYTES (at least 1): per query, the gathered
  rows and their float32 gradient [B, K, Dk], and four float32 [B, N, K] arrays (logits, probabilities, dP, dS)."""
  batch, _, heads, dk = q.shape
  per_row = batch * indices.shape[-1] * (dk * (kv.dtype.itemsize + 4) + 4 * heads * 4)
  return max(1, BLOCK_BYTES // per_row)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sparse_mla(q, kv, indices, scale, v_dim, rows_per_block):
  return _fwd(q, kv, indices, scale, v_dim, rows_per_block)[0]


def _fwd(q, kv, indices, scale, v_dim, rows_per_block):
  block = lambda args: reference.sparse_mla(args[0], kv, args[1], scale=scale, v_dim=v_dim)
  out, lse = jax.lax.map(block, (pad_chunks(q, rows_per_block), pad_chunks(indices, rows_per_block, -1)))
  out, lse = unchunk(out, q.shape[1]), unchunk(lse, q.shape[1])
  return (out, lse), (q, kv, indices, out, lse)


def _bwd(scale, v_dim, rows_per_block, residuals, cotangents):
  q, kv, indices, out, lse = residuals
  dq, dkv = chunked_bwd.sparse_mla_bwd(q, kv, indices, out, lse, *cotangents, scale=scale, v_dim=v_dim,
                                       block_t=rows_per_block)
  return dq, dkv, None


_sparse_mla.defvjp(_fwd, _bwd)


def sparse_mla(q: jax.Array, kv: jax.Array, indices: jax.Array, *, scale: float, v_dim: int,
               rows_per_block: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`reference.sparse_mla` in blocks of query rows: q [B, T, N, Dk], kv [B, S, Dk], indices [B, T, K] (-1 = skip)
  -> (out [B, T, N, v_dim], lse [B, T, N]). rows_per_block: None picks `default_rows_per_block`; T need not be a
  multiple (the last block is padded). scale must be a Python number (it is static in the custom_vjp)."""
  if rows_per_block is None:
    rows_per_block = default_rows_per_block(q, kv, indices)
  return _sparse_mla(q, kv, indices, float(scale), v_dim, min(rows_per_block, q.shape[1]))
