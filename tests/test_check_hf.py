"""experiments/check_hf: a PASS/FAIL verdict against a stated tolerance, exit status 1 on FAIL, golden rows that
are missing skipped with a message."""

import os
import shutil
import subprocess
import sys

import numpy as np

from experiments import check_hf
from tests.conftest import FIXTURES, REPO


def _check(*flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "experiments.check_hf", *flags], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_verdict_needs_every_error_and_topk_within_tolerance():
  assert check_hf.verdict([("logits", 1e-6, None), ("layer 0", float("nan"), 0.0)], 1e-4, 0.0)
  assert not check_hf.verdict([("logits", 1.02, None)], 1e-4, 0.0)
  assert not check_hf.verdict([("logits", 1e-6, None), ("layer 0", 1e-6, 0.25)], 1e-4, 0.0)
  assert check_hf.verdict([("layer 0", 1e-6, 0.25)], 1e-4, 0.5)


def test_topk_mismatch_ignores_order():
  golden = np.array([[[1, 2, 3], [4, 5, 6]]])
  assert check_hf.topk_mismatch(golden[..., ::-1], golden) == 0.0
  assert check_hf.topk_mismatch(np.array([[[1, 2, 3], [4, 5, 7]]]), golden) == 0.5


def test_a_mismatch_fails_with_exit_status_1():
  done = _check("--attention=dense")  # the golden file is HF's DSA forward
  assert done.returncode == 1, done.stderr[-2000:]
  assert "FAIL: tolerance" in done.stdout


def test_rows_the_golden_file_lacks_are_skipped_and_the_rest_passes(tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / "hf_deepseek_v32_tiny", path)
  golden = dict(np.load(path / "golden.npz"))
  del golden["hidden_layer1"]
  np.savez(path / "golden.npz", **golden)
  done = _check(f"--path={path}")
  assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
  assert "skipped (not in golden.npz): hidden_layer1" in done.stdout and "PASS: tolerance" in done.stdout
