"""Timing and memory helpers shared by every benchmark section (GPU machine)."""

import statistics
import time
from collections.abc import Callable

import jax

# Every row any section has emitted in this process, in order, and a hook run after each (`bench_kernels` rewrites
# its JSON record there, so that a section that fails or a run stopped by a time limit keeps what it measured).
EMITTED: list[dict] = []
on_emit: Callable[[], None] | None = None


def emit(rows: list[dict], row: dict) -> None:
  """Appends a measured row to `rows` and to EMITTED, prints it, then runs `on_emit`."""
  rows.append(row)
  EMITTED.append(row)
  print(row, flush=True)
  if on_emit is not None:
    on_emit()


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


def fits(what: str, nbytes: float, budget: int = MEMORY_BUDGET_BYTES) -> bool:
  """Whether a row needing about `nbytes` of device memory fits `budget`; prints that it is skipped if not."""
  if nbytes <= budget:
    return True
  print(f"skipped {what}: needs about {nbytes / 2**30:.1f} GiB of device memory, more than "
        f"{budget / 2**30:.0f} GiB", flush=True)
  return False


def fits_memory(what: str, fn: Callable, *args, budget: int = MEMORY_BUDGET_BYTES) -> bool:
  """`fits` with XLA's plan for the compiled fn(*args) (`peak_bytes_of`; fits when XLA gives none)."""
  peak = peak_bytes_of(fn, *args)
  return peak is None or fits(what, peak, budget)
