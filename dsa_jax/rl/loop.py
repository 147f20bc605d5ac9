"""The GRPO loop: rollout, score (π_old, π_ref), one update; metrics per step; Orbax checkpoints.

DeepSeek-V3.2 §3.1. Thin by design: the maths is in `grpo_step` and `grpo_loss`, sampling in
`dsa_jax.sampling`. The state (`grpo_step.GRPOState`: params, optimizer, reference, RNG, step, data cursor)
is one pytree saved whole by Orbax; the prompts of rollout batch c are drawn from a generator seeded by
(seed, c), so restoring the state resumes the run exactly.
"""

import dataclasses
import functools
import pathlib
import time
from typing import Callable

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.model.config import ModelConfig
from dsa_jax.validation import check_positive
from dsa_jax.rl import grpo_step
from dsa_jax.rl.rewards import Task
from dsa_jax.rl.rollout import draw_prompts, rollout
from dsa_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Batch = num_prompts x group_size sequences; `sampler_dtype` may differ from the trainer's."""
  steps: int = 40
  num_prompts: int = 8
  group_size: int = 8
  prompt_width: int = 12
  learning_rate: float = 3e-4
  sampler_dtype: str | None = None  # None: the trainer's dtype
  seed: int = 0
  checkpoint_every: int = 10
  updates_per_rollout: int = 1  # > 1: several updates on one batch, π_old recorded before the first

  def __post_init__(self):
    check_positive(self, "steps", "num_prompts", "group_size", "prompt_width", "checkpoint_every",
                   "updates_per_rollout")


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


@functools.lru_cache(maxsize=8)
def _update_fn(cfg: ModelConfig, gcfg: grpo_step.GRPOConfig, learning_rate: float):
  """The jitted update, built once per configuration so that resumed or repeated runs reuse its compilation."""
  return grpo_step.make_step(cfg, gcfg, optimizer(learning_rate))


def checkpoint_manager(directory: str | pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))


def restore_latest(manager: ocp.CheckpointManager, template: grpo_step.GRPOState) -> grpo_step.GRPOState:
  """The latest saved state, or `template` when the directory holds none."""
  latest = manager.latest_step()
  if latest is None:
    return template
  return manager.restore(latest, args=ocp.args.StandardRestore(template))


def one_step(cfg: ModelConfig, lcfg: LoopConfig, gcfg: grpo_step.GRPOConfig, sampling: SamplingConfig, task: Task,
             tokenizer: Tokenizer, state: grpo_step.GRPOState, update) -> tuple[grpo_step.GRPOState, dict]:
  """Rollout with the current parameters (π_old = them), score, update -> (state, metrics)."""
  rng, sample_rng = jax.random.split(state.rng)
  prompts, answers = draw_prompts(task, np.random.default_rng([lcfg.seed, int(state.cursor)]), lcfg.num_prompts)
  sampler_cfg = cfg if lcfg.sampler_dtype is None else cfg.replace(dtype=lcfg.sampler_dtype)
  batch, _ = rollout(sampler_cfg, state.params, task, tokenizer, prompts, answers, group_size=lcfg.group_size,
                     prompt_width=lcfg.prompt_width, sampling=sampling, rng=sample_rng)
  batch = grpo_step.score(cfg, gcfg, state.params, state.ref_params, batch, with_old=lcfg.updates_per_rollout > 1)
  state = dataclasses.replace(state, rng=rng, cursor=state.cursor + 1)
  for _ in range(lcfg.updates_per_rollout):
    state, metrics = update(state, batch)
  metrics = {k: float(v) for k, v in metrics.items()}
  metrics["reward"] = float(batch.rewards.mean())
  metrics["exact"] = float((batch.rewards >= 1.0).mean())
  metrics["completion_len"] = float(batch.mask.sum(-1).mean())
  return state, metrics


def train(cfg: ModelConfig, lcfg: LoopConfig, gcfg: grpo_step.GRPOConfig, sampling: SamplingConfig, task: Task,
          tokenizer: Tokenizer, state: grpo_step.GRPOState, checkpoint_dir: str | None = None,
          log: Callable[[dict], None] | None = None) -> tuple[grpo_step.GRPOState, list[dict]]:
  """Runs until lcfg.steps rollout batches were used, resuming from `checkpoint_dir` when it holds a state."""
  manager = None if checkpoint_dir is None else checkpoint_manager(checkpoint_dir)
  if manager is not None:
    state = restore_latest(manager, state)
  update = _update_fn(cfg, gcfg, lcfg.learning_rate)
  history = []
  while int(state.cursor) < lcfg.steps:
    start = time.perf_counter()
    state, metrics = one_step(cfg, lcfg, gcfg, sampling, task, tokenizer, state, update)
    metrics.update(step=int(state.cursor), seconds=time.perf_counter() - start)
    history.append(metrics)
    if log is not None:
      log(metrics)
    done = int(state.cursor)
    if manager is not None and (done % lcfg.checkpoint_every == 0 or done == lcfg.steps):
      manager.save(done, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
  return state, history
