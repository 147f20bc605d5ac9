"""The training loop keeps metrics on the device and fetches them every `log_every` steps (and before a
checkpoint), in one transfer, while still writing one record per step; it stops on a non-finite loss or
gradient norm without saving that state; `metrics.jsonl` is strict JSON and holds each step once after a resume."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.training import loop, train_step
from dsa_jax.training.state import TrainState


class _Data:
  def __next__(self):
    return {"ids": np.zeros((2, 4), np.int32)}

  def get_state(self):
    return {}


class _Checkpointer:
  """Due at step 6 only; records the steps it saves."""

  def __init__(self):
    self.saved = []

  def due(self, step):
    return step == 6

  def save(self, step, state, data_state, force=False):
    if force or self.due(step):
      self.saved.append(step)

  def wait(self):
    pass

  def confirm(self):
    self.confirmed = True


@jax.jit
def _step(state, batch):
  del batch
  loss = 2.0 * state.step.astype(jnp.float32) + 1.0
  return dataclasses.replace(state, step=state.step + 1), {"loss": loss, "lm_loss": loss / 2}


def test_metrics_are_fetched_every_log_every_steps_and_logged_per_step(cfg, tmp_path, monkeypatch, capsys):
  fetched = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda tree: fetched.append(len(tree)) or device_get(tree))
  state = TrainState(params={}, model_state={}, opt_state=(), step=jnp.zeros((), jnp.int32),
                     rng=jnp.zeros((2,), jnp.uint32))
  checkpointer, log = _Checkpointer(), loop.MetricsLog(tmp_path)
  state, stopped = loop.run(train_step.StepConfig(model=cfg, stage="dense"), state, _Data(), steps=10,
                            checkpointer=checkpointer, log=log, flops_per_token=1.0, peak_flops=1.0, log_every=4,
                            step_fn=_step, final=False)
  log.close()
  assert not stopped and int(state.step) == 10 and checkpointer.saved == [6]
  # Fetched after the first (compiling) step, at 4 and 8 (log_every), before the checkpoint at 6, and at the end.
  assert fetched == [1, 3, 2, 2, 2]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 11))
  assert [r["loss"] for r in records] == [2.0 * s + 1.0 for s in range(10)]
  assert records[4]["step_time_s"] == records[5]["step_time_s"]  # steps 5 and 6 were fetched together
  printed = [line.split()[2] for line in capsys.readouterr().out.splitlines()]
  assert printed == ["4/10", "8/10", "10/10"]


def _strict(line: str) -> dict:
  return json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


@jax.jit
def _nan_at_7(state, batch):
  state, metrics = _step(state, batch)
  bad = state.step == 7
  return state, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"]),
                 "grad_norm_main": jnp.where(bad, jnp.inf, 1.0)}


def test_a_non_finite_step_stops_the_loop_before_any_later_save(cfg, tmp_path):
  state = TrainState(params={}, model_state={}, opt_state=(), step=jnp.zeros((), jnp.int32),
                     rng=jnp.zeros((2,), jnp.uint32))
  checkpointer, log = _Checkpointer(), loop.MetricsLog(tmp_path)
  checkpointer.due = lambda step: step in (6, 8)
  with pytest.raises(loop.NonFiniteError) as err:
    loop.run(train_step.StepConfig(model=cfg, stage="dense"), state, _Data(), steps=10, checkpointer=checkpointer,
             log=log, flops_per_token=1.0, peak_flops=1.0, log_every=4, step_fn=_nan_at_7, final=True)
  log.close()
  assert checkpointer.saved == [6]  # step 8's fetch finds step 7: no save at 8, no final save
  assert "step 7" in str(err.value) and "loss" in str(err.value)
  records = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 8)) and records[-1]["loss"] == "nan"
  assert loop.read_metrics(tmp_path / "metrics.jsonl")[-1]["grad_norm_main"] == float("inf")


def test_resuming_drops_the_records_after_the_restored_step(tmp_path):
  log = loop.MetricsLog(tmp_path)
  for step in range(1, 11):
    log.write(step, {"loss": float(step)})
  log.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 11, "lo')  # a line cut by a kill
  loop.MetricsLog(tmp_path, start_step=6).close()
  assert [r["step"] for r in loop.read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 7))
  loop.MetricsLog(tmp_path, start_step=0).close()  # a run that starts over keeps none
  assert (tmp_path / "metrics.jsonl").read_text() == ""


class _BadData(_Data):
  """One id outside the vocabulary, or rows longer than the model's positions."""

  def __init__(self, ids):
    self.ids = ids

  def __next__(self):
    return {"ids": self.ids}


@pytest.mark.parametrize("make, message", [
    (lambda v, p: np.zeros((2, 4), np.int32) + np.eye(2, 4, 3, dtype=np.int32) * v,
     r"batch\['ids'\]\[0, 3\]={v} is outside the vocabulary; allowed: 0 <= value < {v}"),
    (lambda v, p: np.zeros((2, p + 1), np.int32), r"batch\['ids'\] has shape \(2, {p1}\); allowed: \[B, T\] with "
                                                   r"B >= 1 and 1 <= T <= max_position={p}"),
])
def test_bad_batches_stop_before_the_step(cfg, tmp_path, make, message):
  v, p = cfg.vocab_size, cfg.max_position
  steps = []
  state = TrainState(params={}, model_state={}, opt_state=(), step=jnp.zeros((), jnp.int32),
                     rng=jnp.zeros((2,), jnp.uint32))
  with pytest.raises(ValueError, match=message.format(v=v, p=p, p1=p + 1)):
    loop.run(train_step.StepConfig(model=cfg, stage="dense"), state, _BadData(make(v, p)), steps=2,
             checkpointer=_Checkpointer(), log=loop.MetricsLog(tmp_path), flops_per_token=1.0, peak_flops=1.0,
             step_fn=lambda s, b: steps.append(1) or _step(s, b), final=False)
  assert not steps
