"""DeepSeekMoE with sigmoid routing (DeepSeek-V3 paper section 2.1.2; official `Gate` and `MoE`, HF
`DeepseekV32TopkRouter`).

Routing: s = sigmoid(x . W_gate) in float32; selection uses s + e_score_correction_bias (the
aux-loss-free balancing bias), restricted to the `topk_groups` groups with the largest sum of their two
best biased scores; gates are the UNBIASED scores of the chosen experts, normalised to sum 1 and multiplied
by the routed scaling factor. Shared experts see every token.

Keep Routing (V3.2 paper section 3.1): `forced_experts` replays recorded choices verbatim; gates are
still computed from the live scores so the router keeps its gradient.
Experts run dropless: assignments sorted by expert, then a grouped matmul
(`pallas_kernels.moe_gmm.api`). Long rows run the routed experts over token chunks, each under
`jax.checkpoint` (`layers.over_token_chunks`, sized by the sorted copies [c k, D]): at 128K tokens and top-8
the sorted token copies alone would take 14 GiB ([T k, D] bf16) and their float32 outputs 28 GiB. The price is
one more forward pass of the routed experts in the backward pass (only one under layer remat too, which keeps
the chunks' output: `layers.CHUNKED_OUTPUT`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax.model.config import MoEConfig
from dsa_jax.model.layers import MLP, RouterBias, constrain, over_token_chunks, param, token_chunk
from pallas_kernels.moe_gmm import api as gmm_api


# (tokens [M, D], experts [M, k], gates [M, k], (w_gate, w_up, w_down) in compute dtype, implementation)
#   -> (routed output [M, D] float32, dropped assignments: int32 scalar). `dsa_jax.sharding.expert_parallel`
#   provides one.
ExpertDispatch = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class MoEAux:
  """One MoE layer's routing: what the balance loss, the bias update and Keep Routing read."""
  experts: jax.Array  # [B, T, k] int32 chosen experts
  scores: jax.Array  # [B, T, E] float32 sigmoid affinities (unbiased)
  dropped_assignments: jax.Array | None = None  # int32 scalar: assignments an `ExpertDispatch` dropped


jax.tree_util.register_dataclass(MoEAux, data_fields=["experts", "scores", "dropped_assignments"], meta_fields=[])


def route(scores: jax.Array, bias: jax.Array, cfg: MoEConfig) -> jax.Array:
  """scores [M, E] (sigmoid), bias [E] -> chosen experts [M, k] (group-limited top-k of scores + bias)."""
  m, e = scores.shape
  biased = scores + bias
  grouped = biased.reshape(m, cfg.num_groups, e // cfg.num_groups)
  best_two = jax.lax.top_k(grouped, min(2, e // cfg.num_groups))[0].sum(-1)  # [M, G]
  _, top_groups = jax.lax.top_k(best_two, cfg.topk_groups)
  group_mask = jnp.zeros((m, cfg.num_groups), bool).at[jnp.arange(m)[:, None], top_groups].set(True)
  allowed = jnp.repeat(group_mask, e // cfg.num_groups, axis=1)
  _, experts = jax.lax.top_k(jnp.where(allowed, biased, -jnp.inf), cfg.experts_per_token)
  return experts.astype(jnp.int32)


def gates(scores: jax.Array, experts: jax.Array, cfg: MoEConfig) -> jax.Array:
  """Unbiased scores of the chosen experts, normalised and scaled -> [M, k] float32."""
  chosen = jnp.take_along_axis(scores, experts, axis=-1)
  if cfg.norm_topk_prob:
    chosen = chosen / (chosen.sum(-1, keepdims=True) + 1e-20)
  return chosen * cfg.routed_scaling_factor


def swiglu_experts(xs: jax.Array, weights: tuple[jax.Array, jax.Array, jax.Array], group_sizes: jax.Array,
                   implementation: str | None) -> jax.Array:
  """Rows xs [M, D] sorted by expert -> down(silu(gate(x)) * up(x)) [M, D]; rows past sum(group_sizes) give 0."""
  w_gate, w_up, w_down = weights
  gate = gmm_api.grouped_matmul(xs, w_gate, group_sizes, implementation=implementation)
  up = gmm_api.grouped_matmul(xs, w_up, group_sizes, implementation=implementation)
  return gmm_api.grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, implementation=implementation)


def routed_experts(tokens: jax.Array, experts: jax.Array, gate_weights: jax.Array,
                   weights: tuple[jax.Array, jax.Array, jax.Array], implementation: str | None) -> jax.Array:
  """Dropless dispatch of tokens [M, D] to experts [M, k] with gates [M, k]: sort the M k assignments by expert,
  grouped matmuls, gate-weighted scatter-add back in float32 -> [M, D] in the tokens' dtype (as HF sums the
  experts' outputs in the hidden dtype; a float32 [T, D] would be 3.5 GiB more to keep at 128K tokens)."""
  m, k = experts.shape
  # Sorting by expert mixes every token with every other: under GSPMD the tokens are gathered whole (replicated)
  # here, on purpose, so that the scatter-adds back into [M, D] (forward, and the gather's transpose in the
  # backward) are computed replicated and then sliced, instead of GSPMD's "involuntary full rematerialization"
  # from a D-sharded scatter to the token-sharded residual stream. Identity without a mesh.
  tokens = constrain(tokens, (None, None))
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token_of = order // k
  group_sizes = jnp.bincount(flat, length=weights[0].shape[0]).astype(jnp.int32)
  out = swiglu_experts(tokens[token_of], weights, group_sizes, implementation)
  out = out.astype(jnp.float32) * gate_weights.reshape(-1)[order][:, None]
  summed = jnp.zeros((m, tokens.shape[-1]), jnp.float32).at[token_of].add(out)
  return constrain(summed, (None, None)).astype(tokens.dtype)


def chunked_routed_experts(tokens: jax.Array, experts: jax.Array, gate_weights: jax.Array,
                           weights: tuple[jax.Array, jax.Array, jax.Array], implementation: str | None,
                           chunk: int) -> jax.Array:
  """`routed_experts` over `chunk` tokens at a time, each chunk rematerialised in the backward pass; padding
  rows go to expert 0 with gate 0 and are dropped."""
  return over_token_chunks(lambda xs: routed_experts(*xs, weights, implementation), (tokens, experts, gate_weights),
                           chunk)


class MoE(nnx.Module):
  """Routed experts stacked as [E, D, F] / [E, F, D], a float32 router, shared experts."""

  def __init__(self, cfg: MoEConfig, *, hidden: int, rngs: nnx.Rngs, dtype: str, param_dtype: str, std: float):
    e, f = cfg.num_experts, cfg.expert_hidden
    self.cfg = cfg
    self.dtype = dtype
    self.router = param(rngs, (hidden, e), ("embed", "experts"), "float32", std)  # gate.weight
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("experts",))  # e_score_correction_bias
    self.w_gate = param(rngs, (e, hidden, f), ("experts", "embed", "expert_mlp"), param_dtype, std)
    self.w_up = param(rngs, (e, hidden, f), ("experts", "embed", "expert_mlp"), param_dtype, std)
    self.w_down = param(rngs, (e, f, hidden), ("experts", "expert_mlp", "embed"), param_dtype, std)
    self.shared = None if cfg.num_shared_experts == 0 else MLP(
        hidden, f * cfg.num_shared_experts, rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=std)

  def __call__(self, x: jax.Array, forced_experts: jax.Array | None = None, implementation: str | None = None,
               dispatch: ExpertDispatch | None = None) -> tuple[jax.Array, MoEAux]:
    """x [B, T, D] -> (y [B, T, D], MoEAux)."""
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    router = constrain(self.router[...], (None, None))  # [D, E] float32, small: whole on every device
    scores = jax.nn.sigmoid(jnp.einsum("md,de->me", tokens.astype(jnp.float32), router))
    if forced_experts is None:
      experts = route(scores, self.bias[...], self.cfg)
    else:
      experts = forced_experts.reshape(b * t, -1).astype(jnp.int32)
    weights = gates(scores, experts, self.cfg)
    dropped = None
    if dispatch is None:
      chunk = token_chunk(self.cfg.experts_per_token * d, self.dtype)
      y = chunked_routed_experts(tokens.astype(self.dtype), experts, weights, self.expert_weights(), implementation,
                                 chunk)
    else:
      y, dropped = dispatch(tokens.astype(self.dtype), experts, weights, self.expert_weights(), implementation)
    y = y.reshape(b, t, d)
    if self.shared is not None:
      y = y + self.shared(x)
    return y.astype(x.dtype), MoEAux(experts.reshape(b, t, -1), scores.reshape(b, t, -1), dropped)

  def expert_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(w_gate, w_up [E, D, F], w_down [E, F, D]) in the compute dtype."""
    return tuple(p[...].astype(self.dtype) for p in (self.w_gate, self.w_up, self.w_down))

