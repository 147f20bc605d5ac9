"""Exact top-k by radix threshold select in XLA: counting passes instead of a sort.

The building blocks of the pruned select (`pruned.py`) wherever its Mosaic GPU kernels do not run: rows longer
than `kernel_select.MAX_KEYS`, and the compaction in GPU interpret mode (`kernel_compact`). Same contract as
`reference.topk_indices` (exact, ties to the lower index, -1 for slots beyond the visible count, ascending):
1. `sortable_keys`: each float32 score becomes a uint32 key whose unsigned order is the float total order
   (-0.0 < +0.0, as the reference).
2. `kth_largest`: the k-th largest key v per row, one bit per pass: each pass counts the keys at or above
   prefix | 2^shift and keeps the bit while the count still reaches k.
3. `select`: keys > v are selected; of the keys == v, the `k - #(> v)` lowest indices (found by the same
   bisection over the index, run only when some row has more finite ties than slots); then the selected mask
   is compacted into ascending positions (cumsum + scatter), -1 padded.
Limits: every pass re-reads the whole [rows, S] block (XLA reductions, no fusion across passes), so alone it is
only ~1.5x faster than `lax.top_k` at 128K keys (docs/kernel_notes.md); scores must not be NaN.
"""

import jax
import jax.numpy as jnp

NEG_INF_KEY = 0x007FFFFF  # sortable_keys(-inf): never selected


def sortable_keys(scores: jax.Array) -> jax.Array:
  """float32 [..., S] -> uint32 keys in the same total order (larger score, larger key)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest(values: jax.Array, k: jax.Array, bits: int = 32, valid: jax.Array | None = None) -> jax.Array:
  """Per row, the largest x < 2^bits with #(values >= x) >= k (values uint32 [R, S], k int32 [R]; 0 if none).

  valid: optional bool [R, S]; only those values are counted.
  """
  prefix = jnp.zeros(values.shape[:-1], jnp.uint32)
  for shift in range(bits - 1, -1, -1):
    candidate = prefix | jnp.uint32(1 << shift)
    at_or_above = values >= candidate[:, None]
    if valid is not None:
      at_or_above &= valid
    count = jnp.sum(at_or_above, axis=-1, dtype=jnp.int32)
    prefix = jnp.where(count >= k, candidate, prefix)
  return prefix


def select(keys: jax.Array, threshold: jax.Array, k: int) -> jax.Array:
  """Step 3: keys uint32 [R, M] and the k-th largest key per row [R] -> int32 [R, k], ascending positions of
  the keys above the threshold and of its lowest-index ties, -1 padded (the -inf key is never selected)."""
  rows, n = keys.shape
  above = keys > threshold[:, None]
  ties = keys == threshold[:, None]
  need = k - jnp.sum(above, axis=-1, dtype=jnp.int32)
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint32), keys.shape)
  n_ties = jnp.sum(ties, axis=-1, dtype=jnp.int32)

  def last_tie_index():
    # The need-th lowest tied index is the need-th largest of (n - 1 - index) over the ties.
    flipped = jnp.uint32(n - 1) - index
    return jnp.uint32(n - 1) - kth_largest(flipped, need, max((n - 1).bit_length(), 1), valid=ties)

  finite_overflow = (n_ties > need) & (threshold != NEG_INF_KEY)
  cut = jax.lax.cond(jnp.any(finite_overflow), last_tie_index, lambda: jnp.full((rows,), n - 1, jnp.uint32))
  selected = (above | (ties & (index <= cut[:, None]))) & (keys != NEG_INF_KEY)
  slot = jnp.cumsum(selected, axis=-1, dtype=jnp.int32) - 1
  slot = jnp.where(selected, slot, k)  # unselected keys land out of bounds and are dropped
  out = jnp.full((rows, k), -1, jnp.int32)
  return out.at[jnp.arange(rows)[:, None], slot].set(index.astype(jnp.int32), mode="drop")


def topk_positions(keys: jax.Array, k: int) -> jax.Array:
  """keys uint32 [R, M] (k <= M) -> int32 [R, k]: ascending positions of each row's top k keys, -1 padded."""
  return select(keys, kth_largest(keys, jnp.full(keys.shape[:1], k, jnp.int32)), k)
