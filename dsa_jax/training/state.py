"""The one state pytree of a training loop (levanter's `TrainerState`): what Orbax saves and restores.

Parameters and the non-parameter model state (the MoE router biases, updated by the aux-loss-free rule of
`moe_balance`) are kept as plain nested dicts, which Orbax and optax handle directly; `model_state` turns
them back into the `nnx.State` that `dsa_jax.model.functional.apply` takes.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainState:
  params: Any  # nested dict of nnx.Param values
  model_state: Any  # nested dict of the other model variables (router biases)
  opt_state: Any
  step: jax.Array  # int32 scalar
  rng: jax.Array  # uint32 [2], a raw PRNG key (Orbax saves plain arrays)


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "model_state", "opt_state", "step", "rng"],
                                 meta_fields=[])


def split_model_state(state: nnx.State) -> tuple[dict, dict]:
  """nnx.State -> (params, other variables), both pure nested dicts."""
  params, rest = nnx.split_state(state, nnx.Param, ...)
  return params.to_pure_dict(), rest.to_pure_dict()


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for key, value in b.items():
    out[key] = _deep_merge(a[key], value) if isinstance(value, dict) and key in a else value
  return out


def model_state(cfg: ModelConfig, params: dict, other: dict) -> nnx.State:
  """(params, other) -> the nnx.State of `functional.apply` (works under jit: no arrays are allocated)."""
  state = functional.abstract_state(cfg)
  nnx.replace_by_pure_dict(state, _deep_merge(params, other))
  return state


def create(cfg: ModelConfig, model: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """A step-0 TrainState from a model state (random init, Orbax or HF weights)."""
  params, other = split_model_state(model)
  return TrainState(params=params, model_state=other, opt_state=optimizer.init(params),
                    step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)))


def start_stage(state: TrainState, optimizer: optax.GradientTransformation) -> TrainState:
  """The same model (copied: the step donates its input) with a fresh optimizer at step 0: a new stage."""
  params, other = jax.tree.map(jnp.copy, (state.params, state.model_state))
  return TrainState(params=params, model_state=other, opt_state=optimizer.init(params),
                    step=jnp.zeros((), jnp.int32), rng=jnp.copy(state.rng))
