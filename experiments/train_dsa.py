"""DSA continued pre-training (issue 5): dense pre-training, indexer warm-up, sparse training, a table.

  python -m experiments.train_dsa                                   # the main job (CPU, a few minutes)
  python -m experiments.train_dsa --config=experiments/configs/train_small.py --config.train.sparse_steps=200
  srun python -m experiments.train_dsa --nosingle_host --config.mesh.fsdp=4 ...  # see docs/sharding.md
"""

import dataclasses
import datetime
import os
import sys

from absl import app, logging
from ml_collections import config_flags

from dsa_jax.data.pipeline import DataConfig
from dsa_jax.data.retrieval import RetrievalConfig
from dsa_jax.checkpoint.hf_config import read_config
from dsa_jax.model.config import IndexerConfig, ModelConfig, preset
from dsa_jax.sharding import distributed
from dsa_jax.sharding.mesh import MeshConfig
from dsa_jax.training import loop, losses, optimizer, recipe

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "train_tiny.py"), "Training configuration.")


def model_config(c) -> ModelConfig:
  """A preset with the config file's indexer, or an HF checkpoint's own shapes with the file's top-k."""
  if c.init == "hf":
    model = read_config(c.init_path)
    return model.replace(indexer=dataclasses.replace(model.indexer, topk=c.model.topk),
                         max_position=c.model.max_position)
  model = preset(c.model.preset)
  return model.replace(indexer=IndexerConfig(num_heads=c.model.index_heads, head_dim=c.model.index_dim,
                                             topk=c.model.topk), max_position=c.model.max_position,
                       vocab_size=c.model.get("vocab_size", model.vocab_size))


def recipe_config(c) -> recipe.RecipeConfig:
  """The ConfigDict of a config file -> the library's frozen, validated dataclasses."""
  model = model_config(c)
  data = DataConfig(seq_len=c.data.seq_len, batch_size=c.data.batch_size, seed=c.data.seed,
                    files=tuple(f for f in c.data.files.split(",") if f), tokenizer=c.data.tokenizer,
                    retrieval=RetrievalConfig(rate=c.data.retrieval_rate, num_pairs=c.data.retrieval_pairs,
                                              digits=c.data.retrieval_digits))
  run_dir = c.run_dir or os.path.join("runs", f"dsa_{c.model.preset}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
  return recipe.RecipeConfig(model=model, data=data, run_dir=run_dir,
                             optimizer=optimizer.OptimizerConfig(**c.optimizer.to_dict()),
                             loss=losses.LossConfig(**c.loss.to_dict()), **c.train.to_dict(), init=c.init,
                             init_path=c.init_path, seed=c.seed, implementation=c.implementation or None,
                             mesh=MeshConfig(**c.mesh.to_dict()))


def main(argv):
  del argv
  distributed.initialize(distributed.DistributedConfig.from_flags())  # before any other JAX call
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  cfg = recipe_config(_CONFIG.value)
  print(f"run directory: {cfg.run_dir}", flush=True)
  results = recipe.run(cfg, loop.StopRequest())
  if results is None:
    sys.exit(143)  # SIGTERM: checkpoint saved; rerun with --config.run_dir to resume
  if all(stage in results for stage in ("dense", "warmup", "sparse")):
    print(recipe.table(results))
  else:  # a subset of the stages (`--config.train.stages`): `plot_dsa_run` merges the parts
    print(f"stages {cfg.stage_names} done; merge runs with python -m experiments.plot_dsa_run --run_dir=A,B")
  print(f"checkpoints, metrics.jsonl, TensorBoard events and results.json in {cfg.run_dir}")


if __name__ == "__main__":
  app.run(main)
