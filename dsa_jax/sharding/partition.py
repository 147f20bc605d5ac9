"""Placing a state and a batch on a mesh, and jitting a step with its shardings declared once.

Parameter shardings come from the state's `logical_axes` (`rules.state_shardings`); the step is traced
under `rules.activate(mesh)` so the model's activation hints resolve (JAX docs, "Distributed arrays and
automatic parallelization"; flax NNX "Scale up on multiple devices").
"""

from collections.abc import Callable, Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsa_jax.sharding import rules


def shard_state(state: nnx.State, mesh) -> nnx.State:
  """Moves a (host or single-device) state onto `mesh`, each variable as its logical axes say."""
  return jax.device_put(state, rules.state_shardings(state, mesh))


def abstract_sharded_state(state: nnx.State, mesh) -> nnx.State:
  """ShapeDtypeStructs carrying their target sharding: an allocation-free stand-in (e.g. for 671B)."""
  def place(sharding, variable):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), variable)

  return jax.tree.map(place, rules.state_shardings(state, mesh), state)  # shardings: a prefix of the state


def batch_shardings(batch: Mapping[str, jax.Array], mesh) -> dict[str, NamedSharding]:
  """Every [B, T] batch field split over the batch axes and the context axis (`rules.batch_bt`)."""
  return {k: NamedSharding(mesh, rules.batch_bt()) for k in batch}


def shard_batch(batch: Mapping[str, jax.Array], mesh) -> dict[str, jax.Array]:
  return jax.device_put(dict(batch), batch_shardings(batch, mesh))


class ShardedFunction:
  """A jitted function whose tracing, lowering and calls all happen under `rules.activate(mesh)`."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with rules.activate(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with rules.activate(self.mesh):
      return self.jitted.lower(*args)


def jit_sharded(fn: Callable, mesh, *, in_shardings, out_shardings=None, donate_argnums=()) -> ShardedFunction:
  """`jax.jit` with explicit in/out shardings over `mesh`, with the model's activation hints active."""
  return ShardedFunction(jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                 donate_argnums=donate_argnums), mesh)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def shardings_like(tree, model_state: nnx.State, mesh):
  """NamedShardings for any pytree holding copies of the model's variables (a TrainState's params as pure
  dicts, AdamW's mu and nu, gradients): each leaf takes the spec of the model variable whose path is the
  longest suffix of its own path and whose rank matches; anything else (step counts, rng) is replicated.
  """
  specs = rules.state_specs(model_state)
  table = {_path(path): spec for path, spec in
           jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}

  def leaf_sharding(path, leaf):
    names = _path(path)
    for start in range(len(names)):
      spec = table.get(names[start:])
      if spec is not None and len(spec) == len(getattr(leaf, "shape", ())):
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)
