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


# What one benchmark computation may take of device memory: fits an 80 GB H100 as well as a 141 GB H200.
MEMORY_BUDGET_BYTES = 75 * 2**30


def fits_memory(label: str, fn: Callable, *args, budget: int = MEMORY_BUDGET_BYTES) -> bool:
  """Whether the compiled fn(*args) needs at most `budget` bytes (`peak_bytes_of`); prints why it is skipped if not."""
  peak = peak_bytes_of(fn, *args)
  if peak is not None and peak > budget:
    print(f"skipped {label}: XLA plans {peak / 2**30:.1f} GiB of device memory, over the {budget / 2**30:.0f} GiB "
          "budget", flush=True)
    return False
  return True
