"""The recipe on a mesh of 8 simulated devices (fsdp x expert x context, so the step's expert dispatch and
context parallelism run) trains a stage to the same losses as on one device, its sharded checkpoint
restores into the mesh's shardings, and invalid meshes fail before any work.

The dense stage is compared: the sparse stage's top-k at random init has (near-)ties among the indexer
scores, which the permuted key order of context parallelism may break differently (with top-k = T it
matches to 1e-7; the step itself is compared under CP in tests/sharding/test_train_step.py)."""

import json

import chex
import pytest

from dsa_jax.data.pipeline import DataConfig
from dsa_jax.data.retrieval import RetrievalConfig
from dsa_jax.sharding import rules
from dsa_jax.sharding.mesh import MeshConfig
from dsa_jax.training import checkpointing, optimizer, recipe
from tests.training.conftest import tiny_config

STEPS = 3


def _config(run_dir, mesh=MeshConfig()) -> recipe.RecipeConfig:
  data = DataConfig(seq_len=32, batch_size=4, retrieval=RetrievalConfig(rate=0.0))
  return recipe.RecipeConfig(model=tiny_config(), data=data, run_dir=str(run_dir), dense_steps=STEPS,
                             optimizer=optimizer.OptimizerConfig(warmup_steps=0), checkpoint_every=0,
                             eval_batches=1, eval_examples=0, mesh=mesh)


def _losses(run_dir) -> list[dict]:
  lines = (run_dir / "dense" / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in r.items() if k != "step_time_s"} for r in map(json.loads, lines)]


def test_dense_stage_on_a_mesh_equals_one_device_and_its_checkpoint_restores(tmp_path):
  recipe.Recipe(_config(tmp_path / "one")).run_stage("dense", "dense", STEPS, None)
  mesh_cfg = _config(tmp_path / "mesh", MeshConfig(fsdp=2, expert=2, context=2))
  state, data = recipe.Recipe(mesh_cfg).run_stage("dense", "dense", STEPS, None)
  one, sharded = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
  assert [r["step"] for r in sharded] == list(range(1, STEPS + 1))
  for a, b in zip(one, sharded):
    assert a.keys() == b.keys()
    chex.assert_trees_all_close(b, a, atol=1e-5, rtol=1e-5)

  checkpoints = tmp_path / "mesh" / "dense" / "checkpoints"
  restored, data_state = checkpointing.Checkpointer(checkpoints, every=1).restore_latest(state)
  assert int(restored.step) == STEPS and data_state == json.loads(json.dumps(data.get_state()))
  assert (checkpoints / str(STEPS) / "data" / "process_0-of-1.json").exists()  # one iterator state per host
  chex.assert_trees_all_equal(restored, state)
  embed = restored.params["embed"]
  assert embed.sharding.spec == rules.spec(("vocab", "embed")) and len(embed.sharding.device_set) == 8


@pytest.mark.parametrize("mesh,message", [
    (MeshConfig(tensor=3), "MeshConfig.tensor=3 is invalid; allowed: a divisor of mla.num_heads=4"),
    (MeshConfig(fsdp=8, expert=2), "batch=4 is invalid"),
])
def test_invalid_mesh_fails_in_the_config(tmp_path, mesh, message):
  with pytest.raises(ValueError, match=message):
    _config(tmp_path, mesh)


def test_mesh_of_the_wrong_size_fails_before_reading_data(tmp_path):
  with pytest.raises(ValueError, match="whose product equals the device count 8"):
    recipe.Recipe(_config(tmp_path, MeshConfig(data=2)))
