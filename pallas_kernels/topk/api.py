"""Public entry point of top-k selection.

Implementations: "xla" (the reference: `lax.top_k`, a full sort per row), "radix" (`kernel.py`: exact
radix threshold select by counting passes, no sort) and "pruned" (`pruned.py`: exact, two short sorts
after discarding groups of keys that cannot hold a top-k key). None picks "pruned" on GPU (fastest on the
H200: 3.0x lax.top_k at 1024 x 128K, radix 1.5x; benchmarks/results/README.md) and "xla" elsewhere.
"pruned_select" (opt-in until measured on the GPU): the pruned select whose two selections take their
thresholds from the Mosaic GPU kernel `kernel_select` and compact in XLA, with no sort.
"""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.topk import kernel, pruned, reference

AVAILABLE = ("xla", "radix", "pruned", "pruned_select")


def topk_indices(scores: jax.Array, k: int, implementation: str | None = None) -> jax.Array:
  """scores [..., S] (-inf = not visible) -> int32 [..., min(k, S)] sorted ascending, -1 padded."""
  if implementation is None and jax.default_backend() == "gpu":
    implementation = "pruned"
  implementation = resolve_implementation(implementation, AVAILABLE)
  if implementation == "radix":
    return kernel.topk_indices(scores, k)
  if implementation == "pruned":
    return pruned.topk_indices(scores, k)
  if implementation == "pruned_select":
    return pruned.topk_indices(scores, k, inner="select")
  return reference.topk_indices(scores, k)
