"""Split-K for decoding: the key set of each query row in `num_splits` parts, merged from (out, lse) partials.

With few query rows (batch 1 to 32) one CTA per (row, 64-head tile) leaves most of an H100/H200's 132 SMs idle, so
each row's keys are split into contiguous parts of whole 64-key blocks, every part gives a partial (out, lse) and
`merge` combines them (an XLA step over [Q, P, N, C], small next to the cache rows read). The rule of
`default_num_splits`: the largest P that keeps Q * P * head tiles CTAs within one wave of the SMs (the kernel holds
one CTA per SM: its shared memory), at most half the key blocks (so that a part keeps a two-block pipeline), at
least 1. Batch 1 at 128 heads: P = min(66, blocks / 2); batch 32: P = 2 (128 CTAs); batch >= 66: P = 1.
"""

import jax
import jax.numpy as jnp

SMS = 132  # streaming multiprocessors of an H100 SXM / H200
BLOCK_K = 64  # keys per kernel step (`sparse_mla.kernel_fwd.Config.block_k`)


def default_num_splits(q_rows: int, keys: int, head_tiles: int, sms: int = SMS) -> int:
  """P for q_rows query rows of `keys` keys each and `head_tiles` CTAs per row (the rule in the module docstring)."""
  blocks = -(-keys // BLOCK_K)
  return max(1, min(sms // (q_rows * head_tiles), blocks // 2))


def split_indices(indices: jax.Array, num_splits: int) -> jax.Array:
  """[Q, K] -> [Q * P, Ks]: row q * P + p holds keys [p Ks, (p + 1) Ks) of row q, Ks a multiple of BLOCK_K
  (-1 padded)."""
  q, k = indices.shape
  per_split = -(-k // (num_splits * BLOCK_K)) * BLOCK_K
  indices = jnp.pad(indices, ((0, 0), (0, num_splits * per_split - k)), constant_values=-1)
  return indices.reshape(q * num_splits, per_split)


def merge(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Partials out [Q, P, N, C], lse [Q, P, N] (natural log; -inf for a part without a valid key) -> (out [Q, N, C]
  float32, lse [Q, N]): out = sum_p exp(lse_p - lse) out_p, lse = logsumexp_p lse_p; out 0, lse -inf for a row
  with no valid key in any part."""
  top = jnp.max(lse, axis=1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lse - top)  # 0 for empty parts
  total = jnp.sum(weights, axis=1)
  merged_lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top[:, 0], -jnp.inf)
  weights = weights / jnp.where(total > 0, total, 1.0)[:, None]
  return jnp.einsum("qpn,qpnc->qnc", weights, out.astype(jnp.float32)), merged_lse
