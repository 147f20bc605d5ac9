"""Expert parallelism at the MoE layer: all-to-all dispatch equals the single-device experts (dropless),
forced routes (Keep Routing) pass through, and a capacity factor drops and reports assignments."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dsa_jax.model import config
from dsa_jax.model.moe import MoE
from dsa_jax.sharding import expert_parallel, partition, rules
from dsa_jax.sharding.mesh import MeshConfig, make_mesh

CFG = config.tiny()
M = 64  # tokens as [B=8, T=8]


@pytest.fixture(scope="module")
def moe_and_tokens():
  moe = MoE(CFG.moe, hidden=CFG.hidden_size, rngs=nnx.Rngs(0), dtype="float32", param_dtype="float32", std=0.02)
  x = jax.random.normal(jax.random.key(1), (8, 8, CFG.hidden_size))
  return nnx.split(moe), x


def run(graph_state, x, mesh=None, forced=None, capacity_factor=None):
  graph, state = graph_state

  def f(state, x):
    dispatch = None if mesh is None else expert_parallel.make_dispatch(mesh, capacity_factor)
    return nnx.merge(graph, state)(x, forced, dispatch=dispatch)

  if mesh is None:
    return jax.jit(f)(state, x)
  x_sh = jax.sharding.NamedSharding(mesh, rules.act_btd())
  return partition.jit_sharded(f, mesh, in_shardings=(rules.state_shardings(state, mesh), x_sh))(
      partition.shard_state(state, mesh), jax.device_put(x, x_sh))


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, expert=4), MeshConfig(expert=2, tensor=4),
                                      MeshConfig(expert=8)])
def test_dropless_equals_single_device(moe_and_tokens, mesh_cfg):
  y0, aux0 = run(*moe_and_tokens)
  y1, aux1 = run(*moe_and_tokens, mesh=make_mesh(mesh_cfg))
  chex.assert_trees_all_close(y1, y0, atol=1e-6, rtol=1e-5)
  assert int(aux1.dropped_assignments) == 0
  assert (aux1.experts == aux0.experts).all()


def test_forced_routes_all_to_one_device(moe_and_tokens):
  """Keep Routing replays recorded choices; here every token goes to experts 0 and 1 (one device)."""
  forced = jnp.broadcast_to(jnp.array([0, 1], jnp.int32), (8, 8, 2))
  y0, _ = run(*moe_and_tokens, forced=forced)
  y1, aux1 = run(*moe_and_tokens, mesh=make_mesh(MeshConfig(expert=4, data=2)), forced=forced)
  chex.assert_trees_all_close(y1, y0, atol=1e-6, rtol=1e-5)
  assert int(aux1.dropped_assignments) == 0


def test_capacity_factor_drops_and_reports(moe_and_tokens):
  forced = jnp.broadcast_to(jnp.array([0, 1], jnp.int32), (8, 8, 2))
  mesh = make_mesh(MeshConfig(expert=4, data=2))
  # 8 tokens x 2 choices per device, all for device 0; capacity 1.0 x 16 / 4 = 4 slots -> 12 dropped each.
  y, aux = run(*moe_and_tokens, mesh=mesh, forced=forced, capacity_factor=1.0)
  assert int(aux.dropped_assignments) == 8 * 12
  y0, _ = run(*moe_and_tokens, forced=forced)
  assert not jnp.allclose(y, y0, atol=1e-4)
  with pytest.raises(ValueError, match="capacity_factor=0"):
    expert_parallel.make_dispatch(mesh, 0)
