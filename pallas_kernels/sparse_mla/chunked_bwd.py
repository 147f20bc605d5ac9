"""Sparse MLA backward as a chunked XLA computation with a fixed summation order: the `deterministic=True`
path of the Pallas API (`api`), whose default backward is the Mosaic GPU kernel of `kernel_bwd`.

Recomputes the probabilities from the saved logsumexp (FlashAttention-2 backward, Dao 2023, Alg. 2, in
the MQA form of DeepSeek-V3.2's sparse attention), a block of query tokens at a time so that the gathered
[T, K, 576] rows and the [T, N, K] probabilities of one block only are live:
  dP = dO V^T, dS = P (dP - delta + dlse) * scale, delta = rowsum(dO * O),
  dq = dS K, dkv[idx] += dS^T q + [P^T dO | 0].
dkv is a scatter-add into the latent rows, since many queries select the same key. On the GPU XLA's
scatter-add uses atomics (order-dependent rounding), so equal rows are first summed with a segmented scan over
the sorted indices, and each scatter writes every row at most once: a fixed summation order.
Today: 78-82 TFLOP/s over 8K-128K keys at V3.2 shapes on an H200 (benchmarks/sparse_mla.md).
"""

import jax
import jax.numpy as jnp
from jax import lax


def _segment_sum_sorted_scatter(dkv: jax.Array, rows: jax.Array, vals: jax.Array) -> jax.Array:
  """dkv [S, D] += vals [M, D] at rows [M] (rows == S are dropped) in a fixed summation order."""
  order = jnp.argsort(rows, stable=True)
  rows, vals = rows[order], vals[order]
  new_row = rows[1:] != rows[:-1]
  starts = jnp.concatenate([jnp.ones((1,), bool), new_row])
  ends = jnp.concatenate([new_row, jnp.ones((1,), bool)])

  def combine(a, b):
    return a[0] | b[0], jnp.where(b[0][..., None], b[1], a[1] + b[1])

  _, sums = lax.associative_scan(combine, (starts, vals))
  target = jnp.where(ends, rows, dkv.shape[0])
  return dkv.at[target].add(sums, mode="drop", unique_indices=True)


def _block_grads(q, kv, idx, lse, do, delta, dlse, *, scale, v_dim):
  """One block of query tokens, one batch row: q [T, N, Dk], idx [T, K] -> dq [T, N, Dk], rows, dgathered."""
  valid = idx >= 0
  gathered = kv[jnp.where(valid, idx, 0)]  # [T, K, Dk]
  logits = jnp.einsum("tnd,tkd->tnk", q, gathered, preferred_element_type=jnp.float32) * scale
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  probs = jnp.where(valid[:, None, :], jnp.exp(logits - finite_lse[..., None]), 0.0)
  dp = jnp.einsum("tnd,tkd->tnk", do, gathered[..., :v_dim], preferred_element_type=jnp.float32)
  ds = probs * (dp - delta[..., None] + dlse[..., None]) * scale
  dq = jnp.einsum("tnk,tkd->tnd", ds.astype(kv.dtype), gathered, preferred_element_type=jnp.float32)
  dg = jnp.einsum("tnk,tnd->tkd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  dv = jnp.einsum("tnk,tnd->tkd", probs.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dg = dg.at[..., :v_dim].add(dv)
  dg = jnp.where(valid[..., None], dg, 0.0)
  rows = jnp.where(valid, idx, kv.shape[0])
  return dq, rows.reshape(-1), dg.reshape(-1, dg.shape[-1])


def sparse_mla_bwd(q, kv, indices, out, lse, do, dlse, *, scale: float, v_dim: int,
                   block_t: int = 256) -> tuple[jax.Array, jax.Array]:
  """Gradients of `reference.sparse_mla` w.r.t. q [B, T, N, Dk] and kv [B, S, Dk] from the saved lse,
  given the cotangents of out (`do`) and of lse (`dlse`, which adds P * dlse to dS)."""
  bsz, t, n, dk = q.shape
  block_t = min(block_t, t)
  pad = -t % block_t
  delta = jnp.einsum("btnd,btnd->btn", out.astype(jnp.float32), do.astype(jnp.float32))
  pad_t = lambda x, value=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  blocks = lambda x: jnp.moveaxis(x.reshape(bsz, -1, block_t, *x.shape[2:]), 1, 0)
  xs = (blocks(pad_t(q)), blocks(pad_t(indices.astype(jnp.int32), -1)), blocks(pad_t(lse)),
        blocks(pad_t(do)), blocks(pad_t(delta)), blocks(pad_t(dlse.astype(jnp.float32))))

  def step(dkv, block):
    qb, ib, lb, dob, deltab, dlseb = block
    per_batch = jax.vmap(lambda *a: _block_grads(*a, scale=scale, v_dim=v_dim))
    dq, rows, dg = per_batch(qb, kv, ib, lb, dob, deltab, dlseb)
    return jax.vmap(_segment_sum_sorted_scatter)(dkv, rows, dg), dq

  dkv, dq = lax.scan(step, jnp.zeros(kv.shape, jnp.float32), xs)
  dq = jnp.moveaxis(dq, 0, 1).reshape(bsz, t + pad, n, dk)[:, :t]
  return dq.astype(q.dtype), dkv.astype(kv.dtype)
