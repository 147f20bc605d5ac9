"""experiments/long_context_study --preset=cpu_smoke end to end: train (dense, continuation, warm-up, sparse),
evaluate both models, write JSON, plots and a summary whose numbers are the JSON's (--out's refusal to overwrite is
cli.output_path's, tested in test_cli.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "experiments.long_context_study", *flags], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def test_cpu_smoke_study_writes_results_plots_and_a_computed_summary(tmp_path):
  out = tmp_path / "study"
  done = _run("--preset=cpu_smoke", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  for name in ("dense", "DSA"):
    assert len(results["grid"][name]) == 2 * 3  # depths x (pairs, hops) cells with pairs >= hops
    assert results["heldout"][name]["batches"] == 2
  sweep = results["topk_sweep"]
  assert sweep["ks"] == [16, 128]
  for mass in sweep["mass_by_depth"].values():
    assert 0.0 < mass[0] < 1.0 and mass[1] == pytest.approx(1.0, abs=1e-4)  # all visible keys hold all the mass
  assert {"dense", "dense_cont", "warmup", "sparse"} <= set(results["recipe"])
  summary = (out / "summary.md").read_text()
  held = results["heldout"]["DSA"]
  assert f"| DSA | {held['loss']:.4f} | [{held['ci95'][0]:.4f}, {held['ci95'][1]:.4f}] | 2 |" in summary
  assert f"{results['targets']['grid_gap_points']:+.2f} points" in summary
  assert all((out / f).stat().st_size > 0 for f in ("grid.png", "topk.png", "loss.png"))
