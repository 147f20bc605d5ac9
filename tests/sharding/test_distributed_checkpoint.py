"""Multi-host helpers on the simulated mesh, and Orbax saving/restoring a sharded state."""

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsa_jax.model import config, functional
from dsa_jax.sharding import distributed, partition, rules
from dsa_jax.sharding.mesh import MeshConfig, make_mesh


@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator": "10.0.0.1:1234"}, "all three or none"),
    ({"coordinator": "10.0.0.1", "num_processes": 2, "process_id": 0}, "'host:port'"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "process_id=2 is invalid; allowed: 0..1"),
])
def test_distributed_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.DistributedConfig(single_host=False, **kwargs)


def test_initialize_without_cluster_is_an_error(monkeypatch):
  monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  with pytest.raises(ValueError, match="SLURM"):
    distributed.initialize(distributed.DistributedConfig(single_host=False))
  distributed.initialize(distributed.DistributedConfig())  # single host: nothing to do


def test_host_rows_and_global_batch():
  mesh = make_mesh(MeshConfig(data=2, expert=2, context=2))
  assert distributed.host_rows(mesh, 8, 16).tolist() == list(range(8))  # one process holds every device
  assert distributed.host_rows(mesh, 8, 16, process_index=1).size == 0
  ids = np.arange(8 * 16).reshape(8, 16)
  batch = distributed.global_batch({"ids": ids}, mesh, (8, 16))
  assert batch["ids"].sharding.spec == rules.batch_bt()
  np.testing.assert_array_equal(np.asarray(batch["ids"]), ids)


def test_orbax_saves_and_restores_sharded_state(tmp_path):
  cfg = config.tiny()
  mesh = make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
  state = partition.shard_state(functional.init(cfg, seed=3), mesh)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", state)
  target = partition.abstract_sharded_state(functional.abstract_state(cfg), mesh)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", target)
  chex.assert_trees_all_equal(restored, state)
  w = restored["layers"][1]["ffn"]["w_gate"]
  assert w.sharding.spec == rules.spec(("experts", "embed", "expert_mlp"))
  assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (4, 32, 16)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
