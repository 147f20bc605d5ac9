"""A run directory remembers the config that defines its run: a rerun with another one stops with one line
per differing field; starting over is explicit and sets the earlier run aside (nothing deleted)."""

import dataclasses

import pytest

from dsa_jax.data.pipeline import DataConfig
from dsa_jax.training import recipe, run_dir
from tests.training.conftest import tiny_config


def _config(path, **changes) -> recipe.RecipeConfig:
  return recipe.RecipeConfig(model=tiny_config(), data=DataConfig(seq_len=64, batch_size=2), run_dir=str(path),
                             **changes)


def test_a_rerun_with_another_model_config_stops_naming_each_differing_field(tmp_path):
  cfg = _config(tmp_path)
  run_dir.remember(tmp_path, recipe.run_identity(cfg))
  run_dir.remember(tmp_path, recipe.run_identity(dataclasses.replace(cfg, dense_steps=500)))  # a longer run: same
  other = cfg.model.replace(indexer=dataclasses.replace(cfg.model.indexer, num_heads=8, topk=16))
  with pytest.raises(run_dir.RunConfigError) as err:
    run_dir.remember(tmp_path, recipe.run_identity(dataclasses.replace(cfg, model=other)))
  lines = str(err.value).splitlines()
  assert str(tmp_path) in lines[0]
  assert "model.indexer.num_heads: 4 in the run directory, 8 now" in lines
  assert "model.indexer.topk: 8 in the run directory, 16 now" in lines
  assert len(lines) == 4 and "restart_from_scratch" in lines[-1]


def test_starting_over_sets_the_earlier_run_aside(tmp_path):
  cfg = _config(tmp_path)
  run_dir.remember(tmp_path, recipe.run_identity(cfg))
  (tmp_path / "dense").mkdir()
  (tmp_path / "dense" / "metrics.jsonl").write_text("{}\n")
  other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=7))
  run_dir.remember(tmp_path, recipe.run_identity(other), restart=True)
  aside = tmp_path / "set_aside" / "1"
  assert (aside / "dense" / "metrics.jsonl").read_text() == "{}\n" and not (tmp_path / "dense").exists()
  run_dir.remember(tmp_path, recipe.run_identity(other))  # the new config is the run's now


def test_the_recipe_checks_its_run_directory_before_reading_any_data(tmp_path):
  run_dir.remember(tmp_path, recipe.run_identity(_config(tmp_path)))
  with pytest.raises(run_dir.RunConfigError, match="seed: 0 in the run directory, 1 now"):
    recipe.Recipe(_config(tmp_path, seed=1))
