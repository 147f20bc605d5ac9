"""Decode caches of DeepSeek-V3.2: per layer the MLA latent entries and the lightning indexer's keys.

Spec section 1 (MQA mode, indexer): in MQA mode every token's key is one shared entry [c | k_rope]
(C + R = 576 values in V3.2) and its value is c, so one latent row per token and layer is the whole
attention cache; the indexer keeps its own key (H = 128 values) per token and layer. Official
`MLA.forward` keeps `kv_cache` / `pe_cache` and `Indexer.forward` keeps `k_cache` the same way.

All sequences of a batch write at the same slot (`length`); per-sequence prompt lengths are handled
with left padding by the caller: a padded slot carries segment id -1 so no real token ever sees it, and
a slot not written yet carries position int32-max so no query sees it (`pallas_kernels.visibility`).
Decoding through the cache then attends to exactly the keys the full forward attends to.
"""

import dataclasses

import jax
import jax.numpy as jnp

from dsa_jax.model.config import ModelConfig

UNWRITTEN_POSITION = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's cache and the slot its next write goes to."""
  latent: jax.Array  # [B, S, C + R]: [c | k_rope] per token, RoPE already applied
  index_k: jax.Array | None  # [B, S, H] indexer keys (None for a dense DeepSeek-V3 config)
  length: jax.Array  # int32 scalar: slots written so far

  def append(self, latent: jax.Array, index_k: jax.Array | None) -> "LayerCache":
    """Writes T new entries ([B, T, C + R] and [B, T, H]) at slots length .. length + T - 1."""
    start = (0, self.length, 0)
    new_latent = jax.lax.dynamic_update_slice(self.latent, latent.astype(self.latent.dtype), start)
    new_index_k = None if self.index_k is None else jax.lax.dynamic_update_slice(
        self.index_k, index_k.astype(self.index_k.dtype), start)
    return LayerCache(new_latent, new_index_k, self.length + latent.shape[1])


@dataclasses.dataclass(frozen=True)
class KVCache:
  """The caches of all layers plus the key positions and segment ids they share."""
  layers: tuple[LayerCache, ...]
  positions: jax.Array  # [B, S] int32, UNWRITTEN_POSITION on free slots
  segment_ids: jax.Array  # [B, S] int32

  @property
  def length(self) -> jax.Array:
    return self.layers[0].length

  def layer(self, i: int) -> LayerCache:
    return self.layers[i]

  def with_layers(self, layers: tuple[LayerCache, ...]) -> "KVCache":
    return dataclasses.replace(self, layers=layers)

  def with_keys(self, positions: jax.Array, segment_ids: jax.Array) -> "KVCache":
    """Records the positions/segment ids [B, T] of the T tokens about to be written at `length`."""
    start = (0, self.length)
    return dataclasses.replace(
        self, positions=jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), start),
        segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32), start))


jax.tree_util.register_dataclass(LayerCache, data_fields=["latent", "index_k", "length"], meta_fields=[])
jax.tree_util.register_dataclass(KVCache, data_fields=["layers", "positions", "segment_ids"], meta_fields=[])


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of `max_len` slots in the compute dtype (the MTP layer is not cached)."""
  dtype = jnp.dtype(cfg.dtype)
  index_dim = None if cfg.indexer is None else cfg.indexer.head_dim
  layer = lambda: LayerCache(
      jnp.zeros((batch, max_len, cfg.mla.latent_dim), dtype),
      None if index_dim is None else jnp.zeros((batch, max_len, index_dim), dtype), jnp.zeros((), jnp.int32))
  return KVCache(tuple(layer() for _ in range(cfg.num_layers)),
                 jnp.full((batch, max_len), UNWRITTEN_POSITION, jnp.int32), jnp.full((batch, max_len), -1, jnp.int32))
