"""The main job: the tiny model on the embedded corpus, CPU, a few minutes.

Rows of 256 tokens with top-k 32 (the `tiny` preset's top-k 8 would be too few to matter), so DSA keeps
an eighth of the keys at the end of a row. `mesh`: the device mesh (`dsa_jax.sharding.mesh.MeshConfig`); all 1
is one device, and the product must equal the device count (`docs/sharding.md`).

Sections mirror the library's dataclasses (`RecipeConfig.from_config`): `model` is a preset and overrides of
its `ModelConfig` fields, `data` a `DataConfig` (`files`: comma-separated), `optimizer`, `loss` and `mesh`
their configs, and `train` with the top-level keys `RecipeConfig`'s own fields.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "model": {"preset": "tiny", "max_position": 512, "indexer": {"num_heads": 4, "head_dim": 16, "topk": 32}},
      "data": {"seq_len": 256, "batch_size": 4, "seed": 0, "files": "", "tokenizer": "byte",
               "retrieval": {"rate": 0.25, "num_pairs": 2, "digits": 3}},
      "optimizer": {"lr_main": 3e-3, "lr_indexer": 1e-3, "lr_indexer_warmup": 1e-3, "warmup_steps": 20},
      "loss": {"mtp_weight": 0.1, "balance_weight": 1e-4},
      "train": {"bias_gamma": 1e-3, "stages": "", "dense_steps": 160, "warmup_steps": 30, "sparse_steps": 70, "compare_dense": True,
                "checkpoint_every": 50, "keep": 2, "log_every": 20, "eval_every": 0, "eval_batches": 2,
                "eval_examples": 16, "export_hf": True},
      "mesh": {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1},
      "init": "random", "init_path": "", "seed": 0, "run_dir": "", "implementation": config_dict.placeholder(str),
      "restart_from_scratch": False,  # True: set the run in run_dir aside and start over (`training/run_dir.py`)
  })
