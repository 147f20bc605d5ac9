"""Starting points of the recipe: an HF checkpoint and our own Orbax checkpoint."""

import dataclasses

import jax
import numpy as np

from dsa_jax.checkpoint.hf_config import read_config
from dsa_jax.checkpoint.hf_convert import load_hf
from dsa_jax.data.pipeline import DataConfig
from dsa_jax.training import checkpointing, recipe, state
from tests.conftest import FIXTURES

TINY_HF = FIXTURES / "hf_deepseek_v32_tiny"


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_hf_then_orbax_starts_carry_the_weights(tmp_path):
  model = read_config(TINY_HF)
  model = model.replace(indexer=dataclasses.replace(model.indexer, topk=4))
  cfg = recipe.RecipeConfig(model=model, data=DataConfig(), run_dir=str(tmp_path), init="hf", init_path=str(TINY_HF))
  from_hf = recipe.initial_state(cfg)
  assert _same(from_hf.params, state.split_model_state(load_hf(TINY_HF)[1])[0]) and int(from_hf.step) == 0
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", every=1)
  ckpt.save(7, from_hf, {})
  ckpt.wait()
  from_orbax = recipe.initial_state(dataclasses.replace(cfg, init="orbax", init_path=str(tmp_path / "ckpt")))
  assert _same(from_orbax.params, from_hf.params) and int(from_orbax.step) == 0
