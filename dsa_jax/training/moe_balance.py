"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2): after each step every MoE layer's
routing bias moves by gamma against its expert's load, bias_i += gamma * sign(mean_j load_j - load_i).

Default gamma 0.001: DeepSeek-V3 section 4.2 (the bias update speed for the first 14.3T tokens; 0 after).
The bias only steers selection; gates use the unbiased scores (`dsa_jax.model.moe`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dsa_jax.model import LayerAux, MoEAux

DEFAULT_GAMMA = 1e-3


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
  """experts [B, T, k] -> tokens routed to each expert [E] (float32)."""
  return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.float32)


def _moved(ffn: dict, aux: MoEAux, gamma: float) -> dict:
  """One MoE layer's variables with its router bias moved against this step's load."""
  load = expert_load(aux.experts, ffn["bias"].shape[0])
  return {**ffn, "bias": ffn["bias"] + gamma * jnp.sign(load.mean() - load)}


def update(model_state: dict, layer_aux: Sequence[LayerAux], gamma: float, mtp_aux: LayerAux | None = None) -> dict:
  """New router biases of every MoE layer from this step's routing (`MoEAux.experts` of each MoE layer).

  `mtp_aux` (`ModelOutput.mtp_aux`, when the MTP block ran) moves the MTP block's router bias too.
  """
  layers = dict(model_state["layers"])
  for i, aux in enumerate(layer_aux):
    if aux.moe is not None:
      layers[i] = {**layers[i], "ffn": _moved(layers[i]["ffn"], aux.moe, gamma)}
  new = {**model_state, "layers": layers}
  if mtp_aux is not None and mtp_aux.moe is not None:
    block = model_state["mtp"]["block"]
    new["mtp"] = {**model_state["mtp"], "block": {**block, "ffn": _moved(block["ffn"], mtp_aux.moe, gamma)}}
  return new


def imbalance(layer_aux: Sequence[LayerAux]) -> jax.Array:
  """Max over MoE layers of max load / mean load (1 = perfectly balanced): a metric."""
  ratios = [jnp.max(l) / jnp.maximum(jnp.mean(l), 1.0) for l in
            (expert_load(a.moe.experts, a.moe.scores.shape[-1]) for a in layer_aux if a.moe is not None)]
  return jnp.max(jnp.stack(ratios)) if ratios else jnp.ones((), jnp.float32)
