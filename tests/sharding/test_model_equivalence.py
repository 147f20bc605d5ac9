"""Forward logits, loss and gradients on 8 simulated devices equal the single-device results (fp32).

Meshes: data x expert (expert parallelism with all-to-all), fsdp x tensor (ZeRO-3 + Megatron), and
context x expert (load-balanced context parallelism with gathered key entries), for dense and sparse
attention. The compiled HLO is checked for the collectives each mesh is meant to use.
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from dsa_jax.model import config, functional
from dsa_jax.sharding import context_parallel, expert_parallel, partition, rules
from dsa_jax.sharding.mesh import MeshConfig, make_mesh

CFG = config.tiny().replace(num_layers=2)  # one dense and one MoE block
B, T = 8, 16
MESHES = {"data2_expert4": MeshConfig(data=2, expert=4), "fsdp4_tensor2": MeshConfig(fsdp=4, tensor=2),
          "context2_expert4": MeshConfig(context=2, expert=4)}


def loss_and_grads(attention, dispatch):
  def loss(state, batch):
    out = functional.apply(CFG, state, batch["ids"], attention=attention, positions=batch["positions"],
                           expert_dispatch=dispatch)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(out.logits), batch["labels"][..., None], -1)[..., 0]
    return nll.mean(), out.logits
  return jax.value_and_grad(loss, has_aux=True)


@pytest.fixture(scope="module")
def problem():
  """State, batch and the single-device (loss, logits), grads of each attention kind (computed once)."""
  state = functional.init(CFG, seed=0)
  ids = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
  batch = {"ids": ids, "labels": jnp.roll(ids, -1, axis=1),
           "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
  reference = {kind: jax.jit(loss_and_grads(kind, None))(state, batch) for kind in ("sparse", "dense")}
  return state, batch, reference


# Dense attention on the two meshes where it differs from sparse in what is communicated (2 CPU cores).
CASES = [("data2_expert4", "sparse"), ("fsdp4_tensor2", "sparse"), ("context2_expert4", "sparse"),
         ("fsdp4_tensor2", "dense"), ("context2_expert4", "dense")]


@pytest.mark.parametrize("mesh_name,attention", CASES)
def test_sharded_equals_single_device(problem, mesh_name, attention):
  state, batch, reference = problem
  (loss0, logits0), grads0 = reference[attention]

  mesh_cfg = MESHES[mesh_name]
  mesh_cfg.validate_model(CFG)
  mesh_cfg.validate_batch(B, T)
  mesh = make_mesh(mesh_cfg)
  cp_batch = partition.shard_batch(context_parallel.to_context_layout(
      {"ids": batch["ids"], "labels": batch["labels"]}, mesh_cfg.context), mesh)
  state_sh = rules.state_shardings(state, mesh)
  step = partition.jit_sharded(loss_and_grads(attention, expert_parallel.make_dispatch(mesh)), mesh,
                               in_shardings=(state_sh, partition.batch_shardings(cp_batch, mesh)),
                               out_shardings=((None, None), state_sh))
  compiled = step.lower(partition.shard_state(state, mesh), cp_batch).compile()
  (loss1, logits1), grads1 = compiled(partition.shard_state(state, mesh), cp_batch)

  hlo = compiled.as_text()
  if mesh_cfg.expert > 1:
    assert "all-to-all" in hlo  # tokens travel to their experts' devices
  if mesh_cfg.context > 1:
    assert "all-gather" in hlo  # key entries gathered over the context shards
  chex.assert_trees_all_close(loss1, loss0, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(context_parallel.from_context_layout(logits1, mesh_cfg.context), logits0,
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads1, grads0, atol=1e-6, rtol=1e-5)
