"""Choosing an implementation: one rule for every kernel's `implementation=` switch."""

from collections.abc import Sequence

import jax

IMPLEMENTATIONS = ("xla", "pallas")


def resolve_implementation(implementation: str | None, available: Sequence[str] = IMPLEMENTATIONS,
                           supported: bool = True) -> str:
  """Returns the implementation to run.

  None picks "pallas" on a GPU backend when the kernel exists and `supported` (the kernel handles these
  shapes and dtypes), "xla" elsewhere. An explicit name must be one of `available`.
  """
  if implementation is None:
    return "pallas" if jax.default_backend() == "gpu" and "pallas" in available and supported else "xla"
  if implementation not in available:
    raise ValueError(f"implementation={implementation!r} is not available here; allowed: {tuple(available)} or None.")
  return implementation
