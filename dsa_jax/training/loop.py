"""The thin training loop: data in, `train_step.step`, metrics out (JSONL + TensorBoard + a progress line),
checkpoints on an interval and on SIGTERM. Everything numeric lives in the step; this file only moves
things around it."""

import json
import pathlib
import signal
import sys
import time
from typing import Iterator

import jax
import numpy as np
from tensorboard.summary import Writer

from dsa_jax.training import checkpointing, train_step
from dsa_jax.training.state import TrainState


class MetricsLog:
  """Appends one JSON object per step to `metrics.jsonl` and the same scalars to TensorBoard events."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.jsonl = (self.directory / "metrics.jsonl").open("a")
    self.tb = Writer(str(self.directory / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    for name, value in metrics.items():
      self.tb.add_scalar(name, value, step=step)

  def close(self) -> None:
    self.jsonl.close()
    self.tb.close()


class StopRequest:
  """Set by SIGTERM (preemption): the loop saves a checkpoint after the current step and returns."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    self.requested = True


def run(config: train_step.StepConfig, state: TrainState, data: Iterator[dict[str, np.ndarray]], *, steps: int,
        checkpointer: checkpointing.Checkpointer, log: MetricsLog, flops_per_token: float, peak_flops: float,
        log_every: int = 10, stop: StopRequest | None = None, label: str = "") -> tuple[TrainState, bool]:
  """Trains `config.stage` from `state.step` up to `steps`; returns (state, whether it stopped early)."""
  label = label or config.stage
  first = int(state.step) + 1
  tokens_since, since = 0, time.perf_counter()
  while int(state.step) < steps:
    batch = next(data)
    started = time.perf_counter()
    state, metrics = train_step.step(state, jax.tree.map(np.asarray, batch), config=config)
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    step = int(state.step)
    log.write(step, {**record, "step_time_s": time.perf_counter() - started})
    checkpointer.save(step, state, checkpointing.data_state(data))
    tokens_since += batch["ids"].size
    if step == first:  # the first step compiles: keep it out of the throughput
      tokens_since, since = 0, time.perf_counter()
    elif step % log_every == 0 or step == steps:
      elapsed = time.perf_counter() - since
      tps = tokens_since / elapsed
      print(f"[{label}] step {step}/{steps} loss {record['loss']:.4f} lm {record['lm_loss']:.4f}"
            + (f" kl {record['kl']:.4f}" if "kl" in record else "")
            + f" | {tps:,.0f} tok/s, MFU {100 * tps * flops_per_token / peak_flops:.2f}%", flush=True)
      tokens_since, since = 0, time.perf_counter()
    if stop is not None and stop.requested:
      checkpointer.save(step, state, checkpointing.data_state(data), force=True)
      checkpointer.wait()
      print(f"[{label}] SIGTERM: saved step {step} to {checkpointer.directory}; stopping.", file=sys.stderr)
      return state, True
  checkpointer.save(int(state.step), state, checkpointing.data_state(data), force=True)
  checkpointer.wait()
  return state, False

