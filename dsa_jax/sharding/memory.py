"""Per-device memory of a sharded training setup, from abstract arrays only (nothing is allocated).

States (parameters, gradients, AdamW moments) are counted exactly from their shardings
(`NamedSharding.shard_shape`). Activations are an analytic estimate, stated with its assumptions in
`activation_bytes`: XLA's real peak depends on scheduling and fusion and is only known after compiling
for the target GPUs.
"""

import dataclasses
import math

import jax
import numpy as np

from dsa_jax.model.config import ModelConfig
from dsa_jax.sharding.mesh import MeshConfig

BF16, FP32, INT32 = 2, 4, 4


def sharded_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs that carry shardings (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class ActivationEstimate:
  """Bytes per device of the activations of one training step, by component."""
  checkpoints: int  # block inputs kept for the backward pass (one per layer)
  layer_working_set: int  # one block recomputed and differentiated (x2 for its cotangents)
  gathered_keys: int  # the context-parallel all-gather of [c | k_rope] and the indexer key
  logits: int  # float32 logits and their gradient

  @property
  def total(self) -> int:
    return self.checkpoints + self.layer_working_set + self.gathered_keys + self.logits


def activation_bytes(cfg: ModelConfig, mesh: MeshConfig, seq_len: int) -> ActivationEstimate:
  """Analytic activations of one `seq_len` sequence per batch shard, bf16 compute.

  Assumptions: per-block rematerialisation (only block inputs are saved); the indexer scores [T, S] and
  the gathered top-k keys [T, K, 576] are never materialised (fused lightning-indexer and sparse-MLA
  kernels); ragged (dropless, unpadded) all-to-all buffers; heads, index heads, expert hidden and vocab
  split over `tensor`; a backward pass needs about as much again as the forward working set.
  """
  t = seq_len // mesh.context  # query tokens per device
  mla, moe, idx = cfg.mla, cfg.moe, cfg.indexer
  heads = mla.num_heads // mesh.tensor
  per_token_mla = BF16 * (mla.q_lora_rank + heads * (mla.qk_head_dim + mla.latent_dim + mla.kv_lora_rank
                                                     + mla.v_head_dim))
  per_token_idx = 0 if idx is None else (BF16 * idx.num_heads // mesh.tensor * idx.head_dim
                                         + FP32 * idx.num_heads + INT32 * idx.topk)
  k = moe.experts_per_token
  per_token_moe = BF16 * (2 * k * cfg.hidden_size + 3 * k * moe.expert_hidden // mesh.tensor)
  per_token_block = BF16 * 4 * cfg.hidden_size + per_token_mla + per_token_idx + per_token_moe
  layers = cfg.num_layers + cfg.num_mtp_layers
  index_dim = 0 if idx is None else idx.head_dim
  return ActivationEstimate(
      checkpoints=layers * t * cfg.hidden_size * BF16,
      layer_working_set=2 * t * per_token_block,
      gathered_keys=seq_len * (mla.latent_dim + index_dim) * BF16,
      logits=2 * t * (cfg.vocab_size // mesh.tensor) * FP32)
