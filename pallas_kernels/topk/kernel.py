"""Exact top-k by radix threshold select: counting passes instead of a sort (`lax.top_k` sorts each row).

Same contract as `reference.topk_indices` (exact, ties to the lower index, -1 for slots beyond the
visible count, indices ascending). The algorithm, all in fused XLA reductions over materialised rows:
1. Map each float32 score to a uint32 key whose unsigned order is the float total order (-0.0 < +0.0, as
   in `lax.top_k`).
2. Find v = the k-th largest key by DIGIT_BITS bits per pass: each pass counts, per row, the keys at or
   above 2^DIGIT_BITS - 1 candidate prefixes and keeps the largest prefix whose count is still >= k.
3. Keys > v are all selected; of the keys == v only the `k - count(> v)` lowest indices are, found by the
   same 4-bit search over the index (skipped at run time unless some row has more finite ties than slots).
4. Compact the selected mask into ascending indices (cumsum + scatter), -1 padded.

Measured on the H200 (benchmarks/results/README.md), 1024 rows, k = 2048: 2.3 ms vs lax.top_k 2.7 ms at
S = 32K, 6.4 ms vs 9.2 ms at S = 128K: exact, but 1.2-1.4x, far from the 10x target. Limits: each of the
~35 passes re-reads the whole [rows, S] float32 block (XLA reductions, no fusion across passes), and the
scores must be materialised per row block. Inside `lax.map` (index_topk's row blocks) the same code ran
20x slower than standalone (1.8 s vs 0.09 s with lax.top_k at T = 32K, not yet diagnosed), so
`lightning_indexer.api.index_topk` selects with lax.top_k by default.
"""

import jax
import jax.numpy as jnp

DIGIT_BITS = 1  # bits per counting pass; on the H200 1 (32 passes) beat 2 and 4 (2.3 vs 5.5 vs 3.5 ms, 1024 x 32K)


def sortable_keys(scores: jax.Array) -> jax.Array:
  """float32 [..., S] -> uint32 keys in the same total order (larger score, larger key)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest(values: jax.Array, k: jax.Array, bits: int, digit_bits: int,
                 valid: jax.Array | None = None) -> jax.Array:
  """Per row, the largest x such that #(values >= x) >= k (values uint32 [R, S], k int32 [R])."""
  prefix = jnp.zeros(values.shape[:-1], jnp.uint32)
  digits = jnp.arange(1, 1 << digit_bits, dtype=jnp.uint32)
  for shift in range(bits - digit_bits, -digit_bits, -digit_bits):
    shift = max(shift, 0)
    candidates = prefix[:, None] | (digits[None, :] << shift)  # [R, 15]
    at_or_above = values[:, None, :] >= candidates[:, :, None]
    if valid is not None:
      at_or_above &= valid[:, None, :]
    counts = jnp.sum(at_or_above, axis=-1, dtype=jnp.int32)  # [R, 15], non-increasing in the digit
    chosen = jnp.sum(counts >= k[:, None], axis=-1, dtype=jnp.uint32)  # largest digit still reaching k
    prefix = prefix | (chosen << shift)
  return prefix


def topk_indices(scores: jax.Array, k: int, digit_bits: int = DIGIT_BITS, threshold=None) -> jax.Array:
  """scores [..., S] float32 (-inf = not visible) -> int32 [..., min(k, S)], as `reference.topk_indices`.

  threshold: optional (keys uint32 [R, S], k) -> the k-th largest key per row [R] (default: the bisection
  of `kth_largest`; `kernel_select.kth_largest_keys` is the Mosaic GPU one).
  """
  *lead, n = scores.shape
  k = min(k, n)
  keys = sortable_keys(scores.reshape(-1, n))
  rows = keys.shape[0]
  want = jnp.full((rows,), k, jnp.int32)
  if threshold is None:
    threshold = lambda keys, want: kth_largest(keys, want, 32, digit_bits)
  return _select(keys, threshold(keys, want), k, digit_bits).reshape(*lead, k)


def _select(keys: jax.Array, threshold: jax.Array, k: int, digit_bits: int) -> jax.Array:
  """Steps 3-4: the keys above the per-row threshold, then the lowest-index ties -> int32 [R, k] ascending."""
  rows, n = keys.shape
  above = keys > threshold[:, None]
  ties = keys == threshold[:, None]
  need = k - jnp.sum(above, axis=-1, dtype=jnp.int32)
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint32), keys.shape)
  n_ties = jnp.sum(ties, axis=-1, dtype=jnp.int32)
  neg_inf_key = sortable_keys(jnp.float32(-jnp.inf))
  index_bits = -(-max((n - 1).bit_length(), 1) // digit_bits) * digit_bits

  def last_tie_index():
    # The need-th lowest tied index is the need-th largest of (n - 1 - index) over the ties.
    flipped = jnp.uint32(n - 1) - index
    return jnp.uint32(n - 1) - kth_largest(flipped, need, index_bits, digit_bits, valid=ties)

  finite_overflow = (n_ties > need) & (threshold != neg_inf_key)
  cut = jax.lax.cond(jnp.any(finite_overflow), last_tie_index, lambda: jnp.full((rows,), n - 1, jnp.uint32))
  selected = (above | (ties & (index <= cut[:, None]))) & (keys != neg_inf_key)
  slot = jnp.cumsum(selected, axis=-1, dtype=jnp.int32) - 1
  slot = jnp.where(selected, slot, k)  # unselected keys land out of bounds and are dropped
  out = jnp.full((rows, k), -1, jnp.int32)
  return out.at[jnp.arange(rows)[:, None], slot].set(index.astype(jnp.int32), mode="drop")
