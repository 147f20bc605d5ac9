"""experiments/cli.py through the commands: user errors in one line (traceback only with --verbose), flag bounds,
GPU-only commands stopping at once on a CPU, and outputs never overwritten without --overwrite."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(module, *flags, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *flags], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=300, check=False)


def _one_line_error(done, *words):
  """Exit status 1, no traceback, one `error:` line naming `words`."""
  assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
  assert "Traceback" not in done.stderr, done.stderr[-2000:]
  errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
  assert len(errors) == 1, done.stderr[-2000:]
  for word in words:
    assert word in errors[0], errors[0]


def test_a_negative_count_is_refused_by_its_flag():
  _one_line_error(_run("context_study", "--num_tasks=-2"), "num_tasks", "-2")


def test_a_misspelled_config_override_is_one_line():
  _one_line_error(_run("train_dsa", "--config.train.sparse_step=200"), "sparse_steps")


def test_a_misspelled_field_in_a_config_file_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text("from experiments.configs import train_tiny\n\ndef get_config():\n  c = train_tiny.get_config()\n"
                    "  c.data.sequence_len = 128\n  return c\n")
  _one_line_error(_run("train_dsa", f"--config={config}"), "RecipeConfig.data.sequence_len is unknown", "seq_len")
  verbose = _run("train_dsa", f"--config={config}", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_an_invalid_config_value_is_one_line():
  _one_line_error(_run("train_dsa", "--config.train.sparse_steps=-3"), "RecipeConfig.sparse_steps=-3")


def test_a_missing_file_is_one_line(tmp_path):
  _one_line_error(_run("check_hf", f"--path={tmp_path / 'none'}"), "none' is neither a directory nor a hub id")
  _one_line_error(_run("train_dsa", f"--config={tmp_path / 'none.py'}"), "none.py")


@pytest.mark.parametrize("module", ["bench_kernels", "profile_kernels"])
def test_gpu_only_commands_stop_at_once_on_a_cpu(module):
  _one_line_error(_run(module), "GPU")


def test_an_existing_output_is_kept_without_overwrite(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "dense.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lm_loss": 2.0, "step_time_s": 1.0}))
  out = tmp_path / "plot.png"
  out.write_text("earlier")
  _one_line_error(_run("plot_dsa_run", f"--run_dir={run_dir}", f"--out={out}"), "--overwrite")
  assert out.read_text() == "earlier"
  done = _run("plot_dsa_run", f"--run_dir={run_dir}", f"--out={out}", "--overwrite")
  assert done.returncode == 0, done.stderr[-2000:]
  assert out.read_bytes().startswith(b"\x89PNG")


def test_the_default_output_is_a_new_run_directory(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "dense.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lm_loss": 2.0, "step_time_s": 1.0}))
  written = []
  for _ in range(2):
    done = _run("plot_dsa_run", f"--run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    written.append(done.stdout.strip().splitlines()[-1].removeprefix("wrote "))
  assert written[0] != written[1] and all(w.startswith("/tmp/dsa_jax/plot_dsa_run/") for w in written)


def test_a_study_reports_its_progress(tmp_path):
  """context_study: one progress line per policy off a terminal, up to every episode; its report goes to --out."""
  done = _run("context_study", "--num_tasks=1", "--windows=3072", f"--out={tmp_path / 'report.md'}")
  assert done.returncode == 0, done.stderr[-2000:]
  lines = [line for line in done.stdout.splitlines() if line.startswith("[context_study]")]
  assert len(lines) == 5 and lines[-1].startswith("[context_study] step 5/5 window 3072, parallel-fewest-step")
  assert (tmp_path / "report.md").is_file()
