"""Public entry point of top-k selection.

Implementations: "xla" (the reference: `lax.top_k`, a full sort per row), "radix" (`kernel.py`: exact
radix threshold select by counting passes, no sort), "pruned" (`pruned.py`: exact, two short sorts
after discarding groups of keys that cannot hold a top-k key), "pruned_select" (the pruned select whose
two selections take their thresholds from the Mosaic GPU kernel `kernel_select` and compact in XLA, with no
sort), "pruned_group_select" (the same with the group maxima and the first threshold fused into the
Mosaic GPU kernel `kernel_group_select`: one read of the rows; exact on the H200 but not faster) and
"pruned_fused_select" (the pruned select with each selection's compaction inside the threshold kernel,
`kernel_compact`). None picks "pruned_fused_select" on GPU and "xla" elsewhere. Measured on the H200 at 1024
rows x 128K, k = 2048 (benchmarks/results/README.md, session 5), all exact: lax.top_k 9.4-9.6 ms, radix 6.4 ms
(1.5x), pruned 3.2 ms (3.0x), pruned_select 1.24-1.28 ms (7.5-7.6x), **pruned_fused_select 0.73-0.79 ms
(12.1-12.9x)**.
"""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.topk import kernel, pruned, reference

AVAILABLE = ("xla", "radix", "pruned", "pruned_select", "pruned_group_select", "pruned_fused_select")


def topk_indices(scores: jax.Array, k: int, implementation: str | None = None) -> jax.Array:
  """scores [..., S] (-inf = not visible) -> int32 [..., min(k, S)] sorted ascending, -1 padded."""
  if implementation is None and jax.default_backend() == "gpu":
    implementation = "pruned_fused_select"
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
