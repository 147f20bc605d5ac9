"""dsa_jax.profiling: summing a Perfetto trace per op (device streams only when there are any)."""

import gzip
import json

from dsa_jax import profiling


def _write(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_op_times_sums_device_events_only(tmp_path):
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  span = lambda pid, name, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name, "ts": 0, "dur": dur}
  _write(tmp_path / "t.trace.json.gz", [meta(1, "/host:CPU"), meta(7, "/device:GPU:0 (stream 3)"),
                                        span(1, "python", 900.0), span(7, "gemm", 30.0), span(7, "gemm", 10.0),
                                        span(7, "topk", 20.0)])
  total, count, summed = profiling.op_times(tmp_path / "t.trace.json.gz")
  assert dict(total) == {"gemm": 40.0, "topk": 20.0}
  assert dict(count) == {"gemm": 2, "topk": 1}
  assert summed == "/device:GPU:0 (stream 3)"
  lines = profiling.table(total, count, calls=2, top=1).splitlines()
  assert lines[1].split()[:3] == ["0.030", "100.0%", "1.5"]  # (all): 60 us over 2 calls, 3 events
  assert lines[2].split() == ["0.020", "66.7%", "1.0", "gemm"] and len(lines) == 3


def test_op_times_falls_back_to_host_without_device(tmp_path):
  _write(tmp_path / "t.trace.json.gz", [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
                                        {"ph": "X", "pid": 1, "name": "fusion", "dur": 5.0}])
  total, _, summed = profiling.op_times(tmp_path / "t.trace.json.gz")
  assert dict(total) == {"fusion": 5.0} and summed == "/host:CPU"


def test_build_targets_run_on_small_inputs():
  """The kernel targets build from the benchmark sections' inputs and run (XLA paths on CPU)."""
  topk, (scores,) = profile_kernels.build("topk", 512)
  assert scores.shape == (512, 512) and topk(scores).shape == (512, 512)  # k = 2048 > S: every visible key
  index_topk, args = profile_kernels.build("index_topk", 256)
  assert index_topk(*args).shape == (1, 256, 256)
  dsa_core, args = profile_kernels.build("dsa_core", 256)
  assert dsa_core(*args).shape == (1, 256, 128, 512)
