"""Choosing an implementation: one rule for every kernel's `implementation=` switch."""

from collections.abc import Sequence

import jax
from jax._src import config as jax_config

IMPLEMENTATIONS = ("xla", "pallas")


def resolve_implementation(implementation: str | None, available: Sequence[str] = IMPLEMENTATIONS,
                           supported: bool = True, gpu_choice: str = "pallas") -> str:
  """Returns the implementation to run.

  None picks `gpu_choice` ("pallas", or e.g. "cudnn") on a GPU backend when it exists and `supported` (it handles
  these shapes and dtypes), "xla" elsewhere. An explicit name must be one of `available`.
  """
  if implementation is None:
    return gpu_choice if jax.default_backend() == "gpu" and gpu_choice in available and supported else "xla"
  if implementation not in available:
    raise ValueError(f"implementation={implementation!r} is not available here; allowed: {tuple(available)} or None.")
  return implementation


def interpreting(interpret) -> bool:
  """Whether Mosaic GPU kernels will run in GPU interpret mode: `interpret` given, or forced by
  `plgpu.force_gpu_interpret_mode` (read from jax's private config, as the context manager sets it). Interpret
  mode cannot run inline Mosaic GPU code (the cp.async gather, the top-k compaction), so callers pick their
  interpretable variant then."""
  return bool(interpret) or jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
