"""DSA continued pre-training (issue 5): dense pre-training, indexer warm-up, sparse training, a table.

  python -m experiments.train_dsa                                   # the main job (CPU, a few minutes)
  python -m experiments.train_dsa --config=experiments/configs/train_small.py --config.train.sparse_steps=200
  srun python -m experiments.train_dsa --nosingle_host --config.mesh.fsdp=4 ...  # see docs/sharding.md

Before the first step it compiles each stage's step and compares XLA's memory estimate with the memory available
(`dsa_jax.training.memory_check`): a run that cannot fit stops at once with the numbers, unless
`--ignore_memory_estimate`.
Rerunning with the same --config.run_dir resumes it; it stops with one clear line (exit 1) when the run
directory holds another config or no usable checkpoint, or a step's loss or gradient norm is not finite;
--config.restart_from_scratch=True sets the earlier run aside and starts over.
"""

import dataclasses
import datetime
import os
import sys

from absl import flags, logging

from dsa_jax.sharding import distributed
from dsa_jax.training import checkpointing, loop, memory_check, recipe, run_dir
from experiments import cli

_CONFIG = cli.define_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "train_tiny.py"), "Training configuration.")
_IGNORE_MEMORY = flags.DEFINE_bool("ignore_memory_estimate", False, "Start even when the memory estimate exceeds "
                                   "the memory available.")


def main(argv):
  del argv
  distributed.initialize(distributed.DistributedConfig.from_flags())  # before any other JAX call
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  with cli.user_errors():
    cfg = recipe.RecipeConfig.from_config(_CONFIG.value)
  if not cfg.run_dir:
    cfg = dataclasses.replace(cfg, run_dir=os.path.join(
        "runs", f"dsa_{_CONFIG.value.model.preset}_{datetime.datetime.now():%Y%m%d_%H%M%S}"))
  print(f"run directory: {cfg.run_dir}", flush=True)
  if not _IGNORE_MEMORY.value:
    print(memory_check.check(cfg), flush=True)
  try:
    results = recipe.run(cfg, loop.StopRequest())
  except (run_dir.RunConfigError, checkpointing.CheckpointError, loop.NonFiniteError) as err:
    sys.exit(f"train_dsa: {err}")
  if results is None:
    sys.exit(143)  # SIGTERM: checkpoint saved; rerun with --config.run_dir to resume
  if all(stage in results for stage in ("dense", "warmup", "sparse")):
    print(recipe.table(results))
  else:  # a subset of the stages (`--config.train.stages`): `plot_dsa_run` merges the parts
    print(f"stages {cfg.stage_names} done; merge runs with python -m experiments.plot_dsa_run --run_dir=A,B")
  print(f"checkpoints, metrics.jsonl, TensorBoard events and results.json in {cfg.run_dir}")


if __name__ == "__main__":
  cli.run(main)
