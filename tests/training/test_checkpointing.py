"""Checkpoints: exact round trip, corrupt and partial checkpoints skipped with a message, and resume
equality of a run killed with SIGKILL (bit for bit on CPU)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from dsa_jax.training import checkpointing
from tests.training.conftest import fresh_state

REPO = pathlib.Path(__file__).resolve().parents[2]


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_corrupt_and_partial_checkpoints_are_skipped_with_a_message(cfg, tmp_path, capsys):
  state = fresh_state(cfg, "sparse")
  ckpt = checkpointing.Checkpointer(tmp_path, every=1)
  ckpt.save(1, state, {"position": 1})
  ckpt.save(2, state, {"position": 2})
  ckpt.wait()
  for path in (tmp_path / "2" / "state").rglob("*"):  # damage every file of the newest step
    if path.is_file():
      path.write_bytes(b"garbage")
  (tmp_path / "3.orbax-checkpoint-tmp-123").mkdir()
  restored, data = checkpointing.Checkpointer(tmp_path, every=1).restore_latest(state)
  err = capsys.readouterr().err
  assert data == {"position": 1} and _equal(restored, state)
  assert f"skipping corrupt checkpoint {tmp_path / '2'}" in err
  assert "skipping partial checkpoint" in err and "3.orbax-checkpoint-tmp-123" in err


def _train(run_dir: pathlib.Path, steps: int) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.Popen([sys.executable, __file__, str(run_dir), str(steps)], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(run_dir: pathlib.Path) -> dict[int, dict]:
  """The last record logged for each step, without wall-clock fields."""
  lines = (run_dir / "dense" / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: {k: v for k, v in r.items() if k != "step_time_s"} for r in map(json.loads, lines)}


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
  steps = 16
  whole = _train(tmp_path / "whole", steps)
  killed = _train(tmp_path / "killed", steps)
  checkpoints = tmp_path / "killed" / "dense" / "checkpoints"
  deadline = time.time() + 240
  while not (checkpoints / "8").exists() and killed.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert (checkpoints / "8").exists(), killed.stdout.read()
  shutil.rmtree(checkpoints / "12", ignore_errors=True)  # the kill may land after a later save: resume from 8
  resumed = _train(tmp_path / "killed", steps)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0 and "resumed at step 8" in out, out
  assert whole.wait(timeout=240) == 0, whole.stdout.read()
  reference, after_resume = _records(tmp_path / "whole"), _records(tmp_path / "killed")
  assert sorted(after_resume) == list(range(1, steps + 1))
  assert all(after_resume[s] == reference[s] for s in range(9, steps + 1))


if __name__ == "__main__":  # one training process of the resume test: the dense stage of a 2-layer tiny model
  from dsa_jax.data.pipeline import DataConfig
  from dsa_jax.training import recipe
  from tests.training.conftest import tiny_config

  config = recipe.RecipeConfig(model=tiny_config(), data=DataConfig(seq_len=64, batch_size=2), run_dir=sys.argv[1],
                               dense_steps=int(sys.argv[2]), checkpoint_every=4, keep=5, eval_batches=1,
                               eval_examples=1)
  recipe.Recipe(config).run_stage("dense", "dense", config.dense_steps, None)
