"""The model as pure functions of a parameter pytree (flax NNX split into graphdef and state).

`init` builds the state (an `nnx.State`: parameters and the router biases); `apply` merges it with the
static graph of a config and runs the forward pass; `abstract_state` shapes it without allocating.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax.model.config import ModelConfig
from dsa_jax.model.kv_cache import KVCache
from dsa_jax.model.paged_cache import PagedKVCache
from dsa_jax.model.mla import AttentionAux, AttentionOptions, TokenLayout
from dsa_jax.model.moe import ExpertDispatch
from dsa_jax.model.transformer import DeepseekV32, ModelOutput


@functools.lru_cache(maxsize=32)
def graphdef(cfg: ModelConfig, indexer_fp8: bool = False) -> nnx.GraphDef:
  """The static structure of a model of this config (cached; built without allocating parameters)."""
  return nnx.split(nnx.eval_shape(lambda: DeepseekV32(cfg, rngs=nnx.Rngs(0), indexer_fp8=indexer_fp8)))[0]


def init(cfg: ModelConfig, seed: int = 0) -> nnx.State:
  """Random parameters (truncated normal, std 0.02; norms 1; router bias 0)."""
  return nnx.split(DeepseekV32(cfg, rngs=nnx.Rngs(seed)))[1]


def abstract_state(cfg: ModelConfig) -> nnx.State:
  """ShapeDtypeStructs of the state, allocating nothing (works for the 671B config on a laptop)."""
  return nnx.split(nnx.eval_shape(lambda: DeepseekV32(cfg, rngs=nnx.Rngs(0))))[1]


def count_params(state: nnx.State) -> int:
  """Number of trainable parameters (nnx.Param leaves; the router biases are state, not parameters)."""
  params = nnx.filter_state(state, nnx.Param) if isinstance(state, nnx.State) else state
  return sum(int(x.size) for x in jax.tree.leaves(params))


def apply(cfg: ModelConfig, state: nnx.State, input_ids: jax.Array, *, attention: str = "sparse",
          mla_mode: str | None = None, implementation: str | None = None, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None, forced_experts: dict[int, jax.Array] | None = None,
          with_mtp: bool = False, indexer_fp8: bool = False, cache: KVCache | PagedKVCache | None = None,
          expert_dispatch: ExpertDispatch | None = None, next_ids: jax.Array | None = None, remat: str = "none",
          with_logits: bool = True, q_chunk: int = 0,
          aux_reducer: Callable[[AttentionAux, TokenLayout], Any] | None = None,
          mqa_operands: bool = False) -> ModelOutput:
  """Runs the model: input_ids [B, T] -> ModelOutput (logits, per-layer hidden states and aux).

  `cache` (`kv_cache.init_cache`, or the paged pool of `paged_cache.init_paged_cache` with `positions`) appends
  the tokens to a decode cache; see `DeepseekV32.__call__`.
  `expert_dispatch` runs the routed experts elsewhere (`dsa_jax.sharding.expert_parallel`); None: on this device.
  `next_ids` feeds the MTP block the next token of each position when the sequence is permuted.
  `remat` ("none" | "layer" | "layer_save_dots") rematerialises each layer in the backward pass;
  `with_logits=False` returns the LM head's input and weights instead of logits (`transformer` docstring).
  `q_chunk` runs each layer's queries in chunks and `aux_reducer` reduces each layer's attention aux inside
  the layer (`mla` docstring). `mqa_operands` returns the MQA operands in MHA mode too (`AttentionOptions`).
  Bad inputs raise ValueError (`transformer.check_inputs`): shapes always, id and position values only when
  concrete (called outside jit).
  """
  model = nnx.merge(graphdef(cfg, indexer_fp8), state)
  options = AttentionOptions(kind=attention, mode=mla_mode, implementation=implementation, q_chunk=q_chunk,
                             aux_reducer=aux_reducer, mqa_operands=mqa_operands)
  return model(jnp.asarray(input_ids), positions=positions, segment_ids=segment_ids, options=options,
               forced_experts=forced_experts, with_mtp=with_mtp, cache=cache, expert_dispatch=expert_dispatch,
               next_ids=next_ids, remat=remat, with_logits=with_logits)


def forward(cfg: ModelConfig, state: nnx.State, input_ids: jax.Array, attention: str = "sparse",
            **kwargs) -> jax.Array:
  """Logits [B, T, V] (float32). The public entry point `dsa_jax.forward`."""
  return apply(cfg, state, input_ids, attention=attention, **kwargs).logits
