"""Logical axis names -> mesh axes: the one table, and the shardings derived from it.

Parameters carry `logical_axes` metadata (`dsa_jax.model.layers.param`); activations are hinted by
logical names inside the model (`layers.constrain`). Both resolve through `RULES` (the flax/maxtext
"logical axis rules" pattern; JAX docs, "Distributed arrays and automatic parallelization").
Activation specs are named by their dims with the glossary letters of style.md (`act_btd`, ...).
"""

import contextlib

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over every data-like axis, the expert axis included
ZERO_AXES = ("fsdp", "context", "expert")  # weights (and their AdamW moments) are sharded over these

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    # ZeRO-3 over fsdp, context and expert (their ranks are data-parallel for these weights), on the first
    # dim that names them; a mesh axis shards one dim, so routed experts keep `expert` for "experts".
    # GSPMD gathers the shards for compute.
    "embed": ZERO_AXES,
    "embed2": ZERO_AXES,
    "q_lora": ZERO_AXES,  # wq_b [q_lora, heads, head_dim] has no embed dim
    "kv_lora": ZERO_AXES,  # wkv_b [kv_lora, heads, head_dim]
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "index_heads": "tensor",
    "index_dim": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_length": "context",  # query positions stay on their context shard
    "act_kv_length": None,  # shared key entries are gathered over the context shards
    "act_embed": None,
    "act_vocab": "tensor",
}


def spec(logical_axes: tuple[str | None, ...]) -> P:
  """PartitionSpec of an array whose dims carry these logical names (unknown names are an error).

  A mesh axis shards at most one dim (e.g. eh_proj ("embed2", "embed")): its first use wins.
  """
  unknown = [a for a in logical_axes if a is not None and a not in RULES]
  if unknown:
    raise ValueError(f"logical axes {unknown} are not in sharding.rules.RULES; allowed: {sorted(RULES)}.")
  used, dims = set(), []
  for name in logical_axes:
    mesh_axes = RULES.get(name) if name is not None else None
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    free = tuple(a for a in mesh_axes if a not in used)
    used.update(free)
    dims.append(None if not free else free[0] if len(free) == 1 else free)
  return P(*dims)


def act_btd() -> P:
  """Residual stream [B, T, D]."""
  return spec(("act_batch", "act_length", "act_embed"))


def act_btv() -> P:
  """Logits [B, T, V]."""
  return spec(("act_batch", "act_length", "act_vocab"))


def act_bsc() -> P:
  """Gathered key entries [B, S, C + R] (latent KV) or [B, S, H] (indexer keys)."""
  return spec(("act_batch", "act_kv_length", None))


def batch_bt() -> P:
  """Token ids, labels, positions, segment ids, loss masks [B, T]."""
  return spec(("act_batch", "act_length"))


def expert_tokens() -> P:
  """Flattened tokens [B*T, ...] as `shard_map` sees them in the MoE: every axis but tensor splits them."""
  return P(BATCH_AXES + ("context",))


def _variable_spec(variable: nnx.Variable) -> P:
  axes = variable.get_metadata().get("logical_axes")
  if axes is None:
    return P()  # scalars and unannotated state (e.g. an optimizer step count) are replicated
  return spec(axes)


def state_specs(state: nnx.State) -> nnx.State:
  """PartitionSpecs of a model state, from each variable's `logical_axes` metadata."""
  return jax.tree.map(_variable_spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh) -> nnx.State:
  """NamedShardings of a model state over `mesh` (concrete or abstract)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state), is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def activate(mesh):
  """Makes `mesh` current and the logical activation hints in the model resolve through `RULES`.

  An `AbstractMesh` (no devices) is made current for tracing and cross-lowering only.
  """
  current = jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh) else jax.set_mesh(mesh)
  with current, spmd.logical_axis_rules(tuple(RULES.items())):
    yield
