"""The thin training loop: data in, `train_step.step`, metrics out (JSONL + TensorBoard + `dsa_jax.progress`),
checkpoints on an interval and on SIGTERM. Everything numeric lives in the step; this file only moves
things around it: on one device the step is `train_step.step`, on a mesh `sharded_step` places the state and
each host's rows as global arrays (JAX docs, "Multi-host and multi-process environments").

The loop never waits for the device between steps: each step's metrics stay on the device and are fetched
in one transfer every `log_every` steps (and after the first, compiling step, before a checkpoint, at the
end and on SIGTERM), then written one record per step; a record's `step_time_s` is the mean over the steps
fetched together. A per-step fetch would make the host wait for every step before dispatching the next.

The NaN guard (`check_finite`) runs at those fetch points: a non-finite loss or gradient norm stops the run
(`NonFiniteError`, with the step and its metrics) within `log_every` steps of it. Every checkpoint save comes
right after a fetch that checked all the steps before it, so no state after a non-finite step is ever saved.
`metrics.jsonl` is strict JSON: non-finite values are written as the strings "nan", "inf" and "-inf"
(`read_metrics` turns them back into floats); a resumed run first drops the records after its start step,
so each step is logged once."""

import json
import math
import pathlib
import signal
import sys
import time
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from tensorboard.summary import Writer

from dsa_jax.model import functional
from dsa_jax.progress import Progress
from dsa_jax.sharding import distributed, partition, rules
from dsa_jax.training import checkpointing, train_step
from dsa_jax.training.state import TrainState

Batch = dict[str, np.ndarray]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict]]


class NonFiniteError(FloatingPointError):
  """A step's loss or gradient norm is NaN or infinite: the run stops and saves nothing after it."""


GUARDED = ("loss", "grad_norm")  # metric names checked by the NaN guard (and every name that starts with one)


def check_finite(step: int, metrics: dict[str, float], label: str) -> None:
  """Raises NonFiniteError naming the step and its metrics when a guarded metric is NaN or infinite."""
  bad = [k for k, v in metrics.items() if k.startswith(GUARDED) and not math.isfinite(v)]
  if bad:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    raise NonFiniteError(f"[{label}] step {step}: non-finite {', '.join(bad)} ({shown}); stopped without saving "
                         "this state; allowed: finite values (resume restarts from the last checkpoint)")


def _strict(value):
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)  # "nan", "inf", "-inf"


def _number(value):
  return float(value) if value in ("nan", "inf", "-inf") else value


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The records of a `metrics.jsonl`, non-finite values back as floats; a line cut by a kill is left out."""
  records = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      records.append({k: _number(v) for k, v in json.loads(line).items()})
    except ValueError:
      continue
  return records


class MetricsLog:
  """Appends one JSON object per step to `metrics.jsonl` and the same scalars to TensorBoard events.

  `start_step`: the step the run starts from (the restored one, 0 for a fresh start); records after it, left
  by an earlier attempt, are dropped so that the re-run logs each step once. Only process 0 writes: the
  metrics are global, and every host would append them to the same shared files.
  """

  def __init__(self, directory: str | pathlib.Path, start_step: int | None = None):
    self.directory = pathlib.Path(directory)
    self.primary = jax.process_index() == 0
    if not self.primary:
      return
    self.directory.mkdir(parents=True, exist_ok=True)
    path = self.directory / "metrics.jsonl"
    if start_step is not None and path.exists():
      kept = [r for r in read_metrics(path) if r.get("step", 0) <= start_step]
      path.write_text("".join(self._line(r) for r in kept))
    self.jsonl = path.open("a")
    self.tb = Writer(str(self.directory / "tensorboard"))

  @staticmethod
  def _line(record: dict) -> str:
    return json.dumps({k: _strict(v) for k, v in record.items()}, allow_nan=False) + "\n"

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.primary:
      return
    self.jsonl.write(self._line({"step": step, **metrics}))
    self.jsonl.flush()
    for name, value in metrics.items():
      self.tb.add_scalar(name, value, step=step)

  def close(self) -> None:
    if not self.primary:
      return
    self.jsonl.close()
    self.tb.close()


class StopRequest:
  """Set by SIGTERM (preemption): the loop saves a checkpoint after the current step and returns."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    self.requested = True


def sharded_step(config: train_step.StepConfig, state: TrainState, mesh, global_batch: int) -> StepFn:
  """`train_step.step` jitted once for `mesh` with the state's shardings (donated) and the batch's; the
  returned function takes this host's rows (`distributed.host_rows` order) and assembles the global batch."""
  state_sh = partition.shardings_like(state, functional.abstract_state(config.model), mesh)
  batch_sh = NamedSharding(mesh, rules.batch_bt())
  jitted = partition.jit_sharded(lambda s, b: train_step.step(s, b, config=config), mesh,
                                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                                 donate_argnums=(0,))

  def step(state: TrainState, rows: Batch) -> tuple[TrainState, dict]:
    seq_len = next(iter(rows.values())).shape[1]
    return jitted(state, distributed.global_batch(rows, mesh, (global_batch, seq_len)))

  return step


class _Pending:
  """Metrics of the steps dispatched since the last fetch, still on the device."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.steps, self.metrics, self.tokens = [], [], 0
    self.since = time.perf_counter()

  def add(self, step: int, metrics: dict, tokens: int) -> None:
    self.steps.append(step)
    self.metrics.append(metrics)
    self.tokens += tokens

  def flush(self, log: MetricsLog, label: str) -> tuple[dict[str, float], float, int]:
    """Fetches every pending step's metrics in one transfer, logs them and checks them (`check_finite`)
    -> (last record, seconds, tokens)."""
    fetched = jax.device_get(self.metrics)
    elapsed = time.perf_counter() - self.since
    record = {}
    for step, metrics in zip(self.steps, fetched):
      record = {k: float(v) for k, v in metrics.items()}
      log.write(step, {**record, "step_time_s": elapsed / len(self.steps)})
      check_finite(step, record, label)
    tokens = self.tokens
    self.reset()
    return record, elapsed, tokens


def run(config: train_step.StepConfig, state: TrainState, data: Iterator[Batch], *, steps: int,
        checkpointer: checkpointing.Checkpointer, log: MetricsLog, flops_per_token: float, peak_flops: float,
        log_every: int = 10, stop: StopRequest | None = None, label: str = "",
        step_fn: StepFn | None = None, data_shards: int = 1, final: bool = True) -> tuple[TrainState, bool]:
  """Trains `config.stage` from `state.step` up to `steps`; returns (state, whether it stopped early).

  Raises NonFiniteError at the first fetch that finds a non-finite step (nothing saved after that step).
  `final` (the stage ends at `steps`) saves a checkpoint there and waits for it; a segment between two
  evaluations (`final=False`) keeps only the periodic saves, so that it does not block on a write.
  `step_fn` (default: `train_step.step` on one device) is e.g. `sharded_step`. Throughput counts global
  tokens (`data_shards` distinct row blocks of the hosts) against `peak_flops` of all the step's devices.
  """
  label = label or config.stage
  step_fn = step_fn or (lambda s, b: train_step.step(s, jax.tree.map(np.asarray, b), config=config))
  first = int(state.step) + 1
  pending = _Pending()
  progress = Progress(steps, label)
  for step in range(first, steps + 1):  # the host counts the steps: reading state.step would wait for the device
    batch = next(data)
    train_step.check_batch(batch, config.model)
    state, metrics = step_fn(state, batch)
    pending.add(step, metrics, batch["ids"].size * data_shards)
    stopping = stop is not None and stop.requested
    report = step != first and (step % log_every == 0 or step == steps)
    if step == first or report or stopping or checkpointer.due(step):
      record, elapsed, tokens = pending.flush(log, label)  # the first step compiles: fetched, and timed, alone
      checkpointer.confirm()  # finite metrics after a restore: the restored checkpoint is known-good
      if step == first:
        progress.begin(step)
      if report:
        tps = tokens / elapsed
        progress.update(step, f"loss {record['loss']:.4f} lm {record['lm_loss']:.4f}"
                        + (f" kl {record['kl']:.4f}" if "kl" in record else "")
                        + f" | {tps:,.0f} tok/s, MFU {100 * tps * flops_per_token / peak_flops:.2f}%")
    checkpointer.save(step, state, checkpointing.data_state(data))
    if stopping:
      progress.close()
      checkpointer.save(step, state, checkpointing.data_state(data), force=True)
      checkpointer.wait()
      print(f"[{label}] SIGTERM: saved step {step} to {checkpointer.directory}; stopping.", file=sys.stderr)
      return state, True
  progress.close()
  if final:
    checkpointer.save(int(state.step), state, checkpointing.data_state(data), force=True)
    checkpointer.wait()
  return state, False

