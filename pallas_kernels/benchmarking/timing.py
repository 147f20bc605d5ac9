"""Timing and memory helpers shared by every benchmark section (GPU machine)."""

import statistics
import time
from collections.abc import Callable

import jax


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 5) -> float:
  """Median wall seconds of `fn(*args)` after `warmup` calls; the outputs are consumed (blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def peak_bytes_of(fn: Callable, *args) -> int | None:
  """Peak device bytes that XLA's memory analysis reports for the compiled `fn(*args)` (None if unknown)."""
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes + analysis.argument_size_in_bytes)


def tflops(flops: float, seconds: float) -> float:
  return flops / seconds / 1e12


DEVICE_BYTES = 75 * 2**30  # what one benchmark row may use of a GPU's memory (an H100 has 80 GB)


def fits(what: str, nbytes: float) -> bool:
  """Whether a row needing about `nbytes` of device memory fits DEVICE_BYTES; prints that it is skipped if not."""
  if nbytes <= DEVICE_BYTES:
    return True
  print(f"skipped {what}: needs about {nbytes / 2**30:.0f} GiB of device memory, more than "
        f"{DEVICE_BYTES / 2**30:.0f} GiB", flush=True)
  return False
