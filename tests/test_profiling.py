"""dsa_jax.profiling: summing a Perfetto trace per op (device streams only when there are any)."""

import gzip
import json
import pathlib
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("target", ["topk", "index_topk", "dsa_core"])
def test_profile_kernels_targets_run_on_small_inputs(target, tmp_path):
  """`python -m experiments.profile_kernels` builds each kernel target from its benchmark's inputs, runs it (XLA
  paths on CPU) and prints the per-op table."""
  done = subprocess.run([sys.executable, "-m", "experiments.profile_kernels", f"--target={target}", "--seq_len=256",
                         "--iters=1", "--top=3", f"--trace_dir={tmp_path}", "--allow_cpu"], capture_output=True, text=True,
                        cwd=pathlib.Path(__file__).resolve().parents[1], timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "100.0%" in done.stdout, done.stdout[-2000:]  # the (all) row of the table
