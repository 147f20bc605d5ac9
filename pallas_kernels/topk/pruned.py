"""Exact top-k by group pruning: two selections over short rows instead of one over the whole row.

Same contract as `reference.topk_indices` (exact, ties to the lower index, -1 for slots beyond the visible count,
indices ascending). `lax.top_k` sorts each row, so its cost grows with the row length S; here:
1. Split the row into S / g contiguous groups of g keys and take each group's maximum (one fused XLA read).
2. Keep the k groups with the largest maxima (ties to the lower group).
3. Gather those k groups' k * g keys, in ascending group order, and take the top k of them (ties to the lower
   position = the lower key index).
Step 3 is exact: order keys by (score desc, index asc) and groups by their best key in that order. If key e is
in the true top k, every group ranked ahead of e's group holds a key ranked ahead of e, and fewer than k keys
are ahead of e, so e's group is among the k kept. Groups are contiguous, so ranking groups by (maximum desc,
group index asc) is that order.

g = the power of two nearest sqrt(S / k) balances the two selections (S = 128K, k = 2048: g = 8, two rows of
16K instead of one of 128K); rows with S < 4k are selected directly. Both selections run on uint32 keys in the
float total order (`radix.sortable_keys`, -0.0 < +0.0 as in the reference): by the Mosaic GPU kernel
`kernel_compact` (threshold and compaction of a row held in SMEM) for rows of at most `kernel_select.MAX_KEYS`
keys, by the XLA radix select (`radix.topk_positions`) for longer ones. No sorts. The `implementation="pallas"`
of `api.topk_indices`; today's figure (1024 x 128K, k = 2048): about 12x `lax.top_k`, benchmarks/topk.md.
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels.topk import kernel_compact, kernel_select, radix


def group_size(n: int, k: int) -> int:
  """Keys per group for rows of n keys (1: no pruning pays off)."""
  if n < 4 * k:
    return 1
  return 1 << round(math.log2(math.sqrt(n / k)))


def group_keys(rows: jax.Array, g: int) -> jax.Array:
  """Step 1's groups: rows [R, S] float32 -> uint32 keys [R, ceil(S / g), g], the padding the -inf key."""
  rows = jnp.pad(rows.astype(jnp.float32), ((0, 0), (0, -rows.shape[1] % g)), constant_values=-jnp.inf)
  return radix.sortable_keys(rows).reshape(rows.shape[0], -1, g)


def topk_positions(keys: jax.Array, k: int, interpret=False) -> jax.Array:
  """keys uint32 [R, M] -> ascending positions of each row's top k [R, k], -1 padded: the Mosaic GPU kernel for
  rows it takes, the XLA radix select for longer ones."""
  if keys.shape[-1] <= kernel_select.MAX_KEYS:
    return kernel_compact.topk_positions(keys, k, interpret=interpret)
  return radix.topk_positions(keys, k)


def topk_indices(scores: jax.Array, k: int, group: int | None = None, interpret=False) -> jax.Array:
  """scores [..., S] float32 (-inf = not visible) -> int32 [..., min(k, S)], as `reference.topk_indices`.

  group: keys per group (default `group_size`; 1 selects directly). interpret: GPU interpret-mode parameters
  of the Mosaic GPU kernels (CPU tests).
  """
  *lead, n = scores.shape
  k = min(k, n)
  g = group_size(n, k) if group is None else group
  if g < 1 or (g > 1 and -(-n // g) < k):
    raise ValueError(f"group={g} is invalid for rows of {n} keys and k={k}; allowed: >= 1 with at least k "
                     "groups per row.")
  rows = scores.reshape(-1, n)
  if g == 1:
    return topk_positions(radix.sortable_keys(rows), k, interpret).reshape(*lead, k)
  keys = group_keys(rows, g)
  r, n_groups, _ = keys.shape
  kept = topk_positions(keys.max(axis=-1), k, interpret)  # step 2: ascending groups; -1: only -inf left
  kept = jnp.where(kept < 0, n_groups, kept)  # -> an all -inf group appended below (never selected)
  keys = jnp.concatenate([keys, jnp.full((r, 1, g), radix.NEG_INF_KEY, jnp.uint32)], axis=1)
  candidates = jnp.take_along_axis(keys, kept[..., None], axis=1).reshape(r, k * g)
  position = topk_positions(candidates, k, interpret)  # step 3: ascending positions = ascending key indices
  safe = jnp.maximum(position, 0)
  index = jnp.take_along_axis(kept, safe // g, axis=-1) * g + safe % g
  return jnp.where((position < 0) | (index >= n), -1, index).astype(jnp.int32).reshape(*lead, k)
