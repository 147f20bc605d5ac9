"""Mesh validation and the logical-axis table (no compilation)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dsa_jax.model import config, functional
from dsa_jax.sharding import context_parallel, rules
from dsa_jax.sharding.mesh import MeshConfig, make_abstract_mesh, make_mesh


def test_make_mesh_names_and_sizes():
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}


@pytest.mark.parametrize("kwargs,message", [
    ({"data": 3}, "product equals the device count 8"),
    ({"data": 0}, "MeshConfig.data=0"),
])
def test_invalid_mesh_for_devices(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(MeshConfig(**kwargs))


@pytest.mark.parametrize("kwargs,message", [
    ({"expert": 16}, "MeshConfig.expert=16 is invalid; allowed: a divisor of moe.num_experts=8"),
    ({"tensor": 8}, "MeshConfig.tensor=8 is invalid; allowed: a divisor of mla.num_heads=4"),
    ({"fsdp": 128}, "MeshConfig.fsdp=128 is invalid; allowed: fsdp\\*context\\*expert a divisor of hidden_size=64"),
    ({"fsdp": 32}, "MeshConfig.fsdp=32 is invalid; allowed: fsdp\\*context\\*expert a divisor of mla.kv_lora_rank=16"),
])
def test_invalid_mesh_for_model(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MeshConfig(**kwargs).validate_model(config.tiny())


def test_invalid_batch():
  with pytest.raises(ValueError, match="batch=6 is invalid; allowed: a multiple of data\\*fsdp\\*expert=4"):
    MeshConfig(data=2, expert=2).validate_batch(6, 16)
  with pytest.raises(ValueError, match="seq_len=12 is invalid; allowed: a multiple of 2\\*context=8"):
    MeshConfig(context=4).validate_batch(1, 12)


def test_parameter_specs_follow_logical_axes():
  specs = rules.state_specs(functional.abstract_state(config.tiny()))
  assert specs["embed"] == P("tensor", ("fsdp", "context", "expert"))
  assert specs["layers"][1]["ffn"]["w_gate"] == P("expert", ("fsdp", "context"), "tensor")
  assert specs["layers"][0]["attn"]["wkv_b"] == P(("fsdp", "context", "expert"), "tensor", None)
  assert specs["layers"][0]["attn"]["wq_a"] == P(("fsdp", "context", "expert"), None)
  # eh_proj ("embed2", "embed"): a mesh axis shards one dim, the first that names it.
  assert specs["mtp"]["eh_proj"] == P(("fsdp", "context", "expert"), None)
  assert specs["layers"][1]["ffn"]["bias"] == P("expert")  # RouterBias carries logical axes too


def test_unknown_logical_axis_is_an_error():
  with pytest.raises(ValueError, match="not in sharding.rules.RULES"):
    rules.spec(("embed", "sequence"))


def test_activation_specs_by_dims():
  assert rules.act_btd() == P(("data", "fsdp", "expert"), "context", None)
  assert rules.act_bsc() == P(("data", "fsdp", "expert"), None, None)
  assert rules.batch_bt() == P(("data", "fsdp", "expert"), "context")


def test_abstract_mesh_needs_no_devices():
  mesh = make_abstract_mesh(MeshConfig(data=4, fsdp=8, expert=8, context=1, tensor=1))
  assert mesh.size == 256 and len(jax.devices()) == 8


def test_load_balanced_order():
  order = context_parallel.load_balanced_order(8, 2)
  assert order.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]  # shard 0: chunks 0 and 3; shard 1: chunks 1 and 2
  x = jax.numpy.arange(16).reshape(2, 8)
  permuted = context_parallel.to_context_layout({"ids": x}, 2)
  assert (context_parallel.from_context_layout(permuted["ids"], 2) == x).all()
  assert permuted["positions"][0].tolist() == order.tolist()
