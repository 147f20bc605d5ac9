"""Whether a training run fits in memory, known before its first step: XLA's own count of each stage's compiled
step against the memory this process can use.

  estimate = max over the run's stages of (arguments + outputs - donated + temporaries of the compiled step)
             + one more train state (the dense stage's end is kept while the stages that start from it run)

The step is compiled from abstract arrays (`jax.eval_shape`: nothing is allocated) with the arguments the loop
passes, so jit reuses the compilation for the first step: the check costs no extra compile. Available memory is
the device's limit minus what is in use on a GPU (`memory_stats`), else the host's available RAM (psutil where
installed, else /proc/meminfo's MemAvailable). Limits: the evaluation's forward passes, the data pipeline and
the runtime are not counted, so a run whose estimate is close to the limit may still not fit; a mesh of several
devices is not checked here (its per-device plan: `experiments/memory_plan.py`).
"""

import dataclasses
import math
import pathlib

import jax
import numpy as np

from dsa_jax.model import functional
from dsa_jax.training import optimizer as optim
from dsa_jax.training import recipe, train_step
from dsa_jax.training import state as state_lib
from dsa_jax.validation import UserError

GIB = 2**30
STAGE_OF = {"dense": "dense", "dense_cont": "dense", "warmup": "warmup", "sparse": "sparse"}


def compiled_bytes(compiled) -> int:
  """Bytes a compiled step needs by XLA's memory analysis: arguments + outputs - donated (aliased) + temporaries."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def available_bytes() -> tuple[int | None, str]:
  """(bytes this process can still allocate, where the number comes from); None where it cannot be read."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.device_kind} memory"
  try:
    import psutil  # noqa: PLC0415 (optional)
    return psutil.virtual_memory().available, "host RAM available"
  except ImportError:
    pass
  meminfo = pathlib.Path("/proc/meminfo")
  if meminfo.exists():
    for line in meminfo.read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024, "host RAM available"
  return None, "unknown"


@dataclasses.dataclass(frozen=True)
class Estimate:
  step_bytes: dict[str, int]  # compiled step of each training stage the run uses
  state_bytes: int  # one train state (parameters, model state, optimizer state)

  @property
  def total(self) -> int:
    return max(self.step_bytes.values()) + self.state_bytes


def estimate(cfg: recipe.RecipeConfig, stop_above: int | None = None) -> Estimate:
  """Compiles the step of every stage `cfg` runs (single device) and sums as in the module docstring; stops at
  the first stage whose estimate exceeds `stop_above` bytes."""
  batch = {k: jax.ShapeDtypeStruct((cfg.data.host_batch_size, cfg.data.seq_len), np.int32)
           for k in ("ids", "loss_mask", "segment_ids", "positions")}
  steps, state_bytes = {}, 0
  for stage in dict.fromkeys(STAGE_OF[name] for name in cfg.stage_names):
    config = train_step.StepConfig(model=cfg.model, stage=stage, optimizer=cfg.optimizer, loss=cfg.loss,
                        bias_gamma=cfg.bias_gamma, implementation=cfg.implementation)
    tx = optim.build(cfg.optimizer, stage)
    state = jax.eval_shape(lambda tx=tx: state_lib.start_stage(
        state_lib.create(cfg.model, functional.init(cfg.model, cfg.seed), tx, cfg.seed), tx))
    steps[stage] = compiled_bytes(train_step.step.lower(state, batch, config=config).compile())
    state_bytes = max(state_bytes, tree_bytes(state))
    if stop_above is not None and steps[stage] + state_bytes > stop_above:
      break
  return Estimate(steps, state_bytes)


def check(cfg: recipe.RecipeConfig) -> str:
  """A line with the estimate and the memory available; raises UserError when the estimate exceeds it."""
  if cfg.mesh.size > 1:
    return "memory check: skipped on a mesh (per-device plan: python -m experiments.memory_plan)"
  free, source = available_bytes()
  est = estimate(cfg, free)
  steps = ", ".join(f"{stage} {b / GIB:.2f}" for stage, b in est.step_bytes.items())
  line = (f"memory estimate: {est.total / GIB:.2f} GiB (largest compiled step; steps {steps} GiB; + one train state "
          f"{est.state_bytes / GIB:.2f} GiB)")
  if free is None:
    return line + "; available memory unknown, not compared"
  if est.total > free:
    raise UserError(f"{line} > {free / GIB:.2f} GiB {source}: the run cannot fit; allowed: a smaller model, "
                    "batch_size or seq_len, or --ignore_memory_estimate to try anyway.")
  return f"{line} <= {free / GIB:.2f} GiB {source}"
