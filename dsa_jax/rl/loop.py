"""The GRPO loop: rollout, score (π_old, π_ref), one update; metrics per step; Orbax checkpoints.

DeepSeek-V3.2 §3.1. Thin by design: the maths is in `grpo_step` and `grpo_loss`, sampling in
`dsa_jax.sampling`. The state (`grpo_step.GRPOState`: params, optimizer, reference, RNG, step, data cursor)
is one pytree saved whole by Orbax; the prompts of rollout batch c are drawn from a generator seeded by
(seed, c), so restoring the state resumes the run exactly. Resume, integrity checks, keep-last-N, the NaN
guard and `metrics.jsonl` follow the pre-training loop's rules (`training.checkpointing`, `training.loop`);
the metrics are fetched every step here (a rollout waits for them anyway), so the guard checks every step.
"""

import dataclasses
import functools
import pathlib
import time
from typing import Callable

import jax
import numpy as np
import optax

from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.model.config import ModelConfig
from dsa_jax.validation import check_positive
from dsa_jax.rl import grpo_step
from dsa_jax.rl.rewards import Task
from dsa_jax.rl.rollout import draw_prompts, rollout
from dsa_jax.sampling import SamplingConfig
from dsa_jax.training import checkpointing
from dsa_jax.training.loop import MetricsLog, check_finite, read_metrics


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
          tokenizer: Tokenizer, state: grpo_step.GRPOState, run_dir: str | None = None,
          log: Callable[[dict], None] | None = None) -> tuple[grpo_step.GRPOState, list[dict]]:
  """Runs until lcfg.steps rollout batches were used -> (state, one record per step).

  With `run_dir`: resumes from `run_dir/checkpoints` (`Checkpointer.resume`), appends to
  `run_dir/metrics.jsonl` (records after the restored step dropped) and returns every record of that file, the
  earlier runs' steps included; without it, this call's steps. Raises NonFiniteError on a non-finite loss or
  gradient norm, before that state is saved.
  """
  checkpointer = metrics_log = None
  if run_dir is not None:
    checkpointer = checkpointing.Checkpointer(pathlib.Path(run_dir) / "checkpoints", every=lcfg.checkpoint_every,
                                              keep=2, data=False)
    restored = checkpointer.resume(state, label="grpo")
    state = state if restored is None else restored[0]
    metrics_log = MetricsLog(run_dir, start_step=int(state.cursor))
  update = _update_fn(cfg, gcfg, lcfg.learning_rate)
  history = []
  try:
    while int(state.cursor) < lcfg.steps:
      start = time.perf_counter()
      state, metrics = one_step(cfg, lcfg, gcfg, sampling, task, tokenizer, state, update)
      done = int(state.cursor)
      metrics["seconds"] = time.perf_counter() - start
      history.append({"step": done, **metrics})
      if log is not None:
        log(history[-1])
      if checkpointer is not None:
        metrics_log.write(done, metrics)
      check_finite(done, metrics, "grpo")
      if checkpointer is not None:
        checkpointer.confirm()
        checkpointer.save(done, state, force=done == lcfg.steps)
  finally:
    if checkpointer is not None:
      checkpointer.close()
      metrics_log.close()
  if run_dir is not None:
    history = read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")
  return state, history
