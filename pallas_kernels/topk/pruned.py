"""Exact top-k by group pruning: two short `lax.top_k` sorts instead of one over the whole row.

Same contract as `reference.topk_indices` (exact, ties to the lower index, -1 for slots beyond the visible
count, indices ascending). `lax.top_k` sorts each row, so its cost grows with the row length S; here:
1. Split the row into S / g contiguous groups of g keys and take each group's maximum (one fused read).
2. Keep the k groups with the largest maxima (`lax.top_k` over S / g values, ties to the lower group).
3. Gather those k groups' k * g keys, in ascending group order, and take the top k of them (`lax.top_k`
   over k * g values, ties to the lower position = the lower key index).
Step 3 is exact: order keys by (score desc, index asc) and groups by their best key in that order. If key
e is in the true top k, every group ranked ahead of e's group holds a key ranked ahead of e, and fewer than
k keys are ahead of e, so e's group is among the k kept. Groups are contiguous, so ranking groups by
(maximum desc, group index asc) is that order, which is how `lax.top_k` breaks ties.

g = the power of two nearest sqrt(S / k) balances the two sorts (S = 128K, k = 2048: g = 8, two sorts of 16K
instead of one of 128K). Rows with S < 4k go straight to `lax.top_k`.

`inner="radix"` does both selections with the radix select of `kernel.py` instead of `lax.top_k` (same
result; its ascending output is the order step 3 needs, so no sorts at all); `inner="select"` does the same
with the thresholds found by the Mosaic GPU kernel of `kernel_select.py` (each row read once instead of 32
times; rows of at most 16384 values, else the XLA bisection). Measured on the H200 at 1024 x 128K, all
exact: lax.top_k 9.5 ms; inner "xla" 3.5 ms, "radix" 2.5 ms, "select" 1.34 ms (7.1x lax.top_k).

`inner="group_select"` is "select" with step 1 and the first threshold fused into one Mosaic GPU kernel
(`kernel_group_select.py`: the rows are streamed once through SMEM, the maxima and their k-th largest come
out together), instead of an XLA group-max pass plus the threshold kernel re-reading the maxima. Same
result; g must be 4, 8 or 16 (or 1: then it is "select"; an automatic g = 2, 4k <= S < 8k, becomes 4) with at
most 16384 groups per row. On the H200 (1024 x 128K) it was exact but not measurably faster than "select"
(1.28-1.37 vs 1.29-1.38 ms), so not the default.

`inner="fused_select"` is "select" with each selection's XLA compaction (a cumsum over the row and a scatter,
~0.45 of the 1.0 ms of device time) moved into the threshold kernel (`kernel_compact`: the row already sits in
SMEM; ballots, popc and one scan give every selected key its output slot). On the H200 at 1024 x 128K, k = 2048:
0.73-0.79 ms against 1.24-1.28 for "select" (12.1-12.9x lax.top_k), exact, also on rows full of ties; the
first selection alone 0.39 ms against 0.69. The default of `api.topk_indices` on the GPU.
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels.topk import kernel, kernel_compact, kernel_group_select, kernel_select, reference


def group_size(n: int, k: int) -> int:
  """Keys per group for rows of n keys (1: no pruning pays off)."""
  if n < 4 * k:
    return 1
  return 1 << round(math.log2(math.sqrt(n / k)))


INNER = ("xla", "radix", "select", "group_select", "fused_select")


def group_rows(rows: jax.Array, g: int) -> jax.Array:
  """rows [R, S] -> groups [R, ceil(S / g), g] float32, -inf padded (padded keys are never selected)."""
  rows = jnp.pad(rows.astype(jnp.float32), ((0, 0), (0, -rows.shape[1] % g)), constant_values=-jnp.inf)
  return rows.reshape(rows.shape[0], -1, g)


def group_maxima(rows: jax.Array, g: int) -> tuple[jax.Array, jax.Array]:
  """Step 1: rows [R, S] -> (groups [R, ceil(S / g), g] float32, -inf padded; their maxima [R, S / g] as int32
  in the float total order that lax.top_k uses, -0.0 < +0.0: a plain max may return -0.0 for a group that
  holds +0.0 and so rank it too low)."""
  groups = group_rows(rows, g)
  ordered = (kernel.sortable_keys(groups) ^ jnp.uint32(0x80000000)).view(jnp.int32)
  return groups, ordered.max(axis=-1)


def from_ordered(ordered: jax.Array) -> jax.Array:
  """Inverse of the total-order int32 view used for the maxima: -> the float32 with that order."""
  key = ordered.view(jnp.uint32) ^ jnp.uint32(0x80000000)
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _threshold_fn(inner: str, interpret):
  """None (the XLA bisection) or the Mosaic GPU threshold kernel for rows it takes."""
  if inner not in ("select", "group_select", "fused_select"):
    return None

  def threshold(keys, want):
    if keys.shape[-1] > kernel_select.MAX_KEYS:
      return kernel.kth_largest(keys, want, 32, kernel.DIGIT_BITS)
    return kernel_select.kth_largest_keys(keys, want, interpret=interpret)
  return threshold


def _selection_fn(inner: str, threshold, interpret):
  """(scores [R, n] float32, k) -> ascending positions [R, k], -1 padded: `kernel.topk_indices` with `threshold`,
  or for inner="fused_select" the threshold-and-compaction kernel `kernel_compact` on rows it takes."""
  def select(scores, k):
    if inner == "fused_select" and scores.shape[-1] <= kernel_select.MAX_KEYS:
      return kernel_compact.topk_positions(kernel.sortable_keys(scores), k, interpret=interpret)
    return kernel.topk_indices(scores, k, threshold=threshold)
  return select


def _radix_pruned(groups: jax.Array, ordered_max: jax.Array, k: int, n: int, select,
                  first: jax.Array | None = None) -> jax.Array:
  """Steps 2-3 without sorts: -> key indices [R, k] ascending, -1 padded (n = unpadded length).

  select: (scores, k) -> ascending positions (`_selection_fn`), for both selections;
  first: the k-th largest maximum's uint32 key per row [R], when already known (`inner="group_select"`): the
  first selection then only compacts.
  """
  rows, n_groups, g = groups.shape
  if first is None:
    kept = select(from_ordered(ordered_max), k)  # ascending; -1: only -inf
  else:
    kept = kernel.topk_indices(from_ordered(ordered_max), k, threshold=lambda keys, want: first)
  kept = jnp.where(kept < 0, n_groups, kept)  # -> an all -inf group appended below (never selected)
  groups = jnp.concatenate([groups, jnp.full((rows, 1, g), -jnp.inf, groups.dtype)], axis=1)
  candidates = jnp.take_along_axis(groups, kept[..., None], axis=1).reshape(rows, k * g)
  position = select(candidates, k)  # ascending = ascending key indices
  index = jnp.take_along_axis(kept, jnp.maximum(position, 0) // g, axis=-1) * g + jnp.maximum(position, 0) % g
  return jnp.where((position < 0) | (index >= n), -1, index).astype(jnp.int32)


def topk_indices(scores: jax.Array, k: int, group: int | None = None, inner: str = "xla",
                 interpret=False) -> jax.Array:
  """scores [..., S] float32 (-inf = not visible) -> int32 [..., min(k, S)], as `reference.topk_indices`.

  interpret: GPU interpret-mode parameters for the Mosaic GPU kernels of `inner="select"` and
  `inner="group_select"` (CPU tests).
  """
  if inner not in INNER:
    raise ValueError(f"inner={inner!r} is invalid; allowed: {INNER}.")
  *lead, n = scores.shape
  k = min(k, n)
  g = group_size(n, k) if group is None else group
  if inner == "group_select" and group is None and g > 1:  # the fused kernel's smallest group: 4 (n >= 4k here)
    g = max(g, kernel_group_select.GROUPS[0])
  if g < 1 or (g > 1 and -(-n // g) < k):
    raise ValueError(f"group={g} is invalid for rows of {n} keys and k={k}; allowed: >= 1 with at least k "
                     "groups per row.")
  if inner == "group_select" and g > 1 and g not in kernel_group_select.GROUPS:
    raise ValueError(f"group={g} is not supported by inner='group_select'; allowed: 1 or "
                     f"{kernel_group_select.GROUPS}.")
  threshold = _threshold_fn(inner, interpret)
  select = _selection_fn(inner, threshold, interpret)
  if g == 1:
    if inner == "xla":
      return reference.topk_indices(scores, k)
    return select(scores.reshape(-1, n), k).reshape(*lead, k)
  if inner == "group_select":  # step 1 and the first threshold in one kernel
    rows = scores.reshape(-1, n)
    ordered_max, first = kernel_group_select.group_maxima_and_threshold(rows, g, k, interpret=interpret)
    return _radix_pruned(group_rows(rows, g), ordered_max, k, n, select, first).reshape(*lead, k)
  groups, ordered_max = group_maxima(scores.reshape(-1, n), g)
  pad = groups.shape[1] * g - n
  if inner != "xla":
    return _radix_pruned(groups, ordered_max, k, n, select).reshape(*lead, k)
  _, kept = jax.lax.top_k(ordered_max, k)
  kept = jnp.sort(kept, axis=-1)  # ascending groups: candidate position order = key index order
  candidates = jnp.take_along_axis(groups, kept[..., None], axis=1).reshape(groups.shape[0], k * g)
  values, position = jax.lax.top_k(candidates, k)
  index = jnp.take_along_axis(kept, position // g, axis=-1) * g + position % g
  index = jnp.where(values == -jnp.inf, n + pad, index)
  index = jnp.sort(index, axis=-1)
  return jnp.where(index >= n, -1, index).astype(jnp.int32).reshape(*lead, k)
