"""Context parallelism: one long sequence split over the `context` mesh axis, load-balanced for causality.

Ordering: the sequence is cut into 2n chunks for n context shards and shard i holds chunks i and 2n-1-i,
so every shard sees the same amount of causal work (the zig-zag layout of Megatron-LM context parallelism
and of Brandon et al. 2023, "Striped Attention"/Llama-3 CP: "each device holds an early and a late chunk").

Attention: queries stay on their shard; per layer the small shared key entries - MLA's 576-dim latent
[c | k_rope] and the indexer's 128-dim key (DeepSeek-V3.2 paper section 2) - are all-gathered over
`context`. The model declares that with the logical axis `act_kv_length` (`mla.KV_ENTRY_AXES`), which
`rules.RULES` leaves unsharded, while queries carry `act_length` -> context. Because visibility is
computed from positions and segment ids (`pallas_kernels.visibility`), the permuted order needs nothing
else: `TokenLayout` holds the local query positions and the gathered key positions, and the indexer,
its top-k, sparse MLA and dense attention all run locally over the gathered keys.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def load_balanced_order(seq_len: int, context: int) -> np.ndarray:
  """Original position of each slot of the sharded sequence [T]: shard i holds chunks i and 2n-1-i."""
  if context == 1:
    return np.arange(seq_len)
  if seq_len % (2 * context):
    raise ValueError(f"seq_len={seq_len} is invalid for context={context}; allowed: a multiple of {2 * context}.")
  chunks = np.arange(seq_len).reshape(2 * context, -1)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * context - 1 - i]]) for i in range(context)])


def to_context_layout(batch: Mapping[str, jax.Array], context: int) -> dict[str, jax.Array]:
  """Permutes every [B, T, ...] field into the load-balanced order and adds explicit `positions`.

  Labels and masks travel with their tokens, so a token-level loss is unchanged by the permutation; labels
  found by shifting along the array must be built before it (`training.train_step.with_labels` does).
  """
  some = next(iter(batch.values()))
  b, t = some.shape[:2]
  order = load_balanced_order(t, context)
  out = {k: jnp.asarray(v)[:, order] for k, v in batch.items()}
  if "positions" not in out:
    out["positions"] = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (b, t))
  return out


def from_context_layout(x: jax.Array, context: int) -> jax.Array:
  """Undoes `to_context_layout` on axis 1 (e.g. logits [B, T, V] back to the original order)."""
  return x[:, np.argsort(load_balanced_order(x.shape[1], context))]


def gathered_bytes_per_layer(seq_len: int, latent_dim: int, index_dim: int, bytes_per_value: int = 2) -> int:
  """Bytes of key entries every context shard holds per layer after the all-gather (S x (576 + 128) in bf16)."""
  return seq_len * (latent_dim + index_dim) * bytes_per_value
