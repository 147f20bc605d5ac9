"""Public entry point of top-k selection.

Implementations: "xla" (the reference: `lax.top_k`, a full sort per row), "radix" (`kernel.py`: exact
radix threshold select by counting passes, no sort), "pruned" (`pruned.py`: exact, two short sorts
after discarding groups of keys that cannot hold a top-k key), "pruned_select" (the pruned select whose
two selections take their thresholds from the Mosaic GPU kernel `kernel_select` and compact in XLA, with no
sort) and "pruned_group_select" (the same with the group maxima and the first threshold fused into the
Mosaic GPU kernel `kernel_group_select`: one read of the rows; exact on the H200 but not faster, so opt-in)
and "pruned_fused_select" (the pruned select with each selection's compaction inside the threshold kernel,
`kernel_compact`; not yet measured on a GPU, so opt-in). None
picks "pruned_select" on GPU and "xla" elsewhere. Measured on the H200 at 1024 rows x 128K,
k = 2048 (benchmarks/results/README.md), all exact: lax.top_k 9.5 ms, radix 6.3 ms (1.5x), pruned 3.5 ms
(2.7x), pruned_select 1.34 ms (7.1x).
"""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.topk import kernel, pruned, reference

AVAILABLE = ("xla", "radix", "pruned", "pruned_select", "pruned_group_select", "pruned_fused_select")


def topk_indices(scores: jax.Array, k: int, implementation: str | None = None) -> jax.Array:
  """scores [..., S] (-inf = not visible) -> int32 [..., min(k, S)] sorted ascending, -1 padded."""
  if implementation is None and jax.default_backend() == "gpu":
    implementation = "pruned_select"
  implementation = resolve_implementation(implementation, AVAILABLE)
  if implementation == "radix":
    return kernel.topk_indices(scores, k)
  if implementation == "pruned":
    return pruned.topk_indices(scores, k)
  if implementation == "pruned_select":
    return pruned.topk_indices(scores, k, inner="select")
  if implementation == "pruned_group_select":
    return pruned.topk_indices(scores, k, inner="group_select")
  if implementation == "pruned_fused_select":
    return pruned.topk_indices(scores, k, inner="fused_select")
  return reference.topk_indices(scores, k)
