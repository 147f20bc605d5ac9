"""Checkpoints: exact round trip, corrupt, unverifiable and partial checkpoints skipped with a message (and
never a silent restart when none is usable), keep-last-N sparing the known-good one, a checkpoint of another
config reported as such, and resume equality of a run killed with SIGKILL (bit for bit on CPU)."""

import dataclasses
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
import pytest

from dsa_jax.training import checkpointing, loop
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


def _saved(directory, state, steps, keep=3):
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=keep)
  for step in steps:
    ckpt.save(step, state, {"position": step})
  ckpt.wait()
  return ckpt


def _flip(path: pathlib.Path, count: int = 64) -> None:
  """Inverts `count` bytes in the middle of the file: a change Orbax itself does not notice."""
  raw = bytearray(path.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
  path.write_bytes(bytes(raw))


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_bytes_are_detected_and_the_previous_checkpoint_restores(cfg, tmp_path, capsys):
  state = fresh_state(cfg, "sparse")
  _saved(tmp_path, state, (1, 2)).close()
  damaged = _largest_file(tmp_path / "2")
  _flip(damaged)
  restored, data = checkpointing.Checkpointer(tmp_path, every=1).restore_latest(state)
  err = capsys.readouterr().err
  assert data == {"position": 1} and _equal(restored, state)
  assert f"skipping corrupt checkpoint {tmp_path / '2'}" in err and damaged.name in err


def test_a_checkpoint_without_its_manifest_is_skipped_as_unverifiable(cfg, tmp_path, capsys):
  state = fresh_state(cfg, "sparse")
  _saved(tmp_path, state, (1, 2)).close()
  (tmp_path / "2" / checkpointing.MANIFEST).unlink()
  _, data = checkpointing.Checkpointer(tmp_path, every=1).restore_latest(state)
  assert data == {"position": 1}
  assert f"skipping unverifiable checkpoint {tmp_path / '2'}" in capsys.readouterr().err


def test_when_every_checkpoint_is_unusable_restore_stops_and_lists_them(cfg, tmp_path):
  state = fresh_state(cfg, "sparse")
  _saved(tmp_path, state, (1, 2)).close()
  _flip(_largest_file(tmp_path / "1"))
  (tmp_path / "2" / checkpointing.MANIFEST).unlink()
  with pytest.raises(checkpointing.CheckpointError) as err:
    checkpointing.Checkpointer(tmp_path, every=1).restore_latest(state)
  message = str(err.value)
  assert "\n" not in message and str(tmp_path / "1") in message and str(tmp_path / "2") in message


def test_a_corrupt_final_checkpoint_is_set_aside_and_saved_again_by_the_rerun(cfg, tmp_path, capsys):
  state = fresh_state(cfg, "sparse")
  _saved(tmp_path, state, (1, 2)).close()
  _flip(_largest_file(tmp_path / "2"))
  ckpt = checkpointing.Checkpointer(tmp_path, every=1)
  _, data = ckpt.resume(state)
  assert data == {"position": 1} and "resumed at step 1" in capsys.readouterr().out
  assert ckpt.save(2, state, {"position": 22}, force=True)  # the re-run's final save
  ckpt.wait()
  _, data = checkpointing.Checkpointer(tmp_path, every=1).restore_latest(state)
  assert data == {"position": 22}
  assert any((tmp_path / "unusable").iterdir())  # the damaged bytes are kept aside, not deleted


def test_keep_last_n_keeps_the_last_known_good_checkpoint_until_a_newer_one_is(cfg, tmp_path):
  state = fresh_state(cfg, "sparse")
  _saved(tmp_path, state, (1,), keep=1).close()
  ckpt = checkpointing.Checkpointer(tmp_path, every=1, keep=1)
  ckpt.resume(state)
  ckpt.confirm()  # step 1 restored and then produced finite metrics
  for step in (2, 3, 4):
    ckpt.save(step, state, {"position": step})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [1, 4]
  ckpt.close()
  ckpt = checkpointing.Checkpointer(tmp_path, every=1, keep=1)
  ckpt.resume(state)  # step 4
  ckpt.confirm()
  ckpt.save(5, state, {"position": 5})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [4, 5]


def test_a_checkpoint_of_another_model_config_is_reported_as_such_in_one_line(cfg, tmp_path):
  _saved(tmp_path, fresh_state(cfg, "sparse"), (1,)).close()
  other = cfg.replace(indexer=dataclasses.replace(cfg.indexer, num_heads=2 * cfg.indexer.num_heads))
  with pytest.raises(checkpointing.CheckpointError) as err:
    checkpointing.Checkpointer(tmp_path, every=1).restore_latest(fresh_state(other, "sparse"))
  message = str(err.value)
  assert "\n" not in message and len(message) < 600 and "corrupt" not in message
  assert str(tmp_path / "1") in message and "does not fit" in message


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
  sealed = checkpoints / "8" / checkpointing.MANIFEST  # committed and sealed: usable
  while not sealed.exists() and killed.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert sealed.exists(), killed.stdout.read()
  shutil.rmtree(checkpoints / "12", ignore_errors=True)  # the kill may land after a later save: resume from 8
  resumed = _train(tmp_path / "killed", steps)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0 and "resumed at step 8" in out, out
  assert whole.wait(timeout=240) == 0, whole.stdout.read()
  reference, after_resume = _records(tmp_path / "whole"), _records(tmp_path / "killed")
  assert sorted(after_resume) == list(range(1, steps + 1))
  logged = [r["step"] for r in loop.read_metrics(tmp_path / "killed" / "dense" / "metrics.jsonl")]
  assert logged == list(range(1, steps + 1))  # each step once: the records after step 8 were dropped on resume
  assert all(after_resume[s] == reference[s] for s in range(9, steps + 1))


if __name__ == "__main__":  # one training process of the resume test: the dense stage of a 2-layer tiny model
  from dsa_jax.data.pipeline import DataConfig
  from dsa_jax.training import recipe
  from tests.training.conftest import tiny_config

  config = recipe.RecipeConfig(model=tiny_config(), data=DataConfig(seq_len=64, batch_size=2), run_dir=sys.argv[1],
                               dense_steps=int(sys.argv[2]), checkpoint_every=4, keep=5, eval_batches=1,
                               eval_examples=1)
  recipe.Recipe(config).run_stage("dense", "dense", config.dense_steps, None)
