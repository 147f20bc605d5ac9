"""Where the device time of a computation goes: run it under `jax.profiler`, sum the Perfetto trace per op.

`trace_calls` runs a callable a few times under the profiler; `op_times` sums each op's time on the device
streams (on a machine without an accelerator, on the host); `table` prints ms per call, share and count per
call of the top ops. Used by `experiments/profile_kernels.py` and `experiments/bench_train_step.py`.
"""

import collections
import gzip
import json
import pathlib
from collections.abc import Callable

import jax


def trace_calls(run: Callable[[], object], calls: int, trace_dir: str | pathlib.Path) -> pathlib.Path:
  """Runs `run()` `calls` times under the profiler (each result blocked on) -> the Perfetto trace written."""
  trace_dir = pathlib.Path(trace_dir)
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(run())
  return max(trace_dir.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)


def op_times(trace_path: pathlib.Path) -> tuple[dict[str, float], dict[str, int], str]:
  """Perfetto trace -> (microseconds per op name, events per op name, which processes were summed)."""
  with gzip.open(trace_path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if name.startswith("/device:")}
  pids = device or set(names)
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in pids:
      total[e["name"]] += e.get("dur", 0.0)
      count[e["name"]] += 1
  return total, count, ", ".join(sorted(names[p] for p in pids))


def top_ops(total: dict[str, float], count: dict[str, int], calls: int, top: int) -> list[dict]:
  """The `top` ops by time -> [{"op", "ms" (per call), "share" (of all summed time), "count" (per call)}]."""
  whole = sum(total.values()) or 1.0
  return [{"op": name, "ms": us / calls / 1e3, "share": us / whole, "count": count[name] / calls}
          for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]]


def table(total: dict[str, float], count: dict[str, int], calls: int, top: int) -> str:
  lines = [f"{'ms/call':>9} {'share':>6} {'n/call':>7}  op", f"{sum(total.values()) / calls / 1e3:9.3f} {1:6.1%} "
           f"{sum(count.values()) / calls:7.1f}  (all)"]
  for row in top_ops(total, count, calls, top):
    lines.append(f"{row['ms']:9.3f} {row['share']:6.1%} {row['count']:7.1f}  {row['op'][:110]}")
  return "\n".join(lines)
