"""experiments/bench_train_step on CPU (--allow_cpu): a row per stage with every field, a skipped row, and an
immediate error without a GPU."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

FIELDS = {"stage", "T", "preset", "moe_layers", "remat", "q_chunk", "device", "status", "compile_s", "estimate_gib", "step_s",
          "step_times_s", "tokens_per_s", "flops_per_token", "mfu", "peak_flops", "peak_gib", "loss", "top_ops"}


def _bench(tmp_path, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  done = subprocess.run([sys.executable, "-m", "experiments.bench_train_step", "--preset=tiny", "--seq_lens=256",
                         "--steps=1", f"--out_dir={tmp_path}", *flags], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  records = sorted(tmp_path.glob("train_step_*.json"))
  return done, json.loads(records[-1].read_text()) if records else None


def test_every_stage_gives_a_row_with_every_field(tmp_path):
  done, record = _bench(tmp_path, "--allow_cpu", "--q_chunk=128")
  assert done.returncode == 0, done.stderr[-3000:]
  assert record["device"] == "cpu" and "--allow_cpu" in record["command"] and record["commit"]
  assert [(r["stage"], r["T"], r["status"]) for r in record["rows"]] == [
      ("dense", 256, "ok"), ("warmup", 256, "ok"), ("sparse", 256, "ok")]
  for row in record["rows"]:
    assert FIELDS <= set(row), FIELDS - set(row)
    assert row["remat"] == "layer" and row["q_chunk"] == 128
    assert row["tokens_per_s"] == 256 / row["step_s"] and 0 < row["mfu"] and row["estimate_gib"] > 0
    assert len(row["top_ops"]) == 15 and {"op", "ms", "share", "count"} <= set(row["top_ops"][0])
  for stage in ("dense", "warmup", "sparse"):
    assert f"[{stage} T=256] ok: step" in done.stdout


def test_a_row_over_max_gib_is_skipped(tmp_path):
  done, record = _bench(tmp_path, "--allow_cpu", "--stages=dense", "--max_gib=0.001", "--noprofile")
  assert done.returncode == 0, done.stderr[-3000:]
  (row,) = record["rows"]
  assert row["status"] == "skipped" and row["estimate_gib"] > 0.001 and "step_s" not in row
  assert "skipped: the compiled step needs about" in done.stdout


def test_without_a_gpu_it_stops_at_once(tmp_path):
  done, record = _bench(tmp_path)
  assert done.returncode != 0 and record is None
  assert "run it on a GPU machine" in done.stderr
