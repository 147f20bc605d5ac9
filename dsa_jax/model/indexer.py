"""The lightning indexer of DeepSeek Sparse Attention (paper section 2.1; official `Indexer.forward`).

I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) with
  q[t] = wq_b(q_latent[t])            I heads x H dims (q_latent: MLA's normalised query latent),
  k[s] = LayerNorm(wk(x[s]))          H dims, one key per token shared by all index heads,
  w[t] = weights_proj(x[t]) * I^-0.5  (float32), and the score scale H^-0.5 folded into w.
RoPE is half-split over the FIRST qk_rope_head_dim dims (the opposite of MLA; spec section 1).
Selection, scoring and masking run through `pallas_kernels.lightning_indexer.api`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax.model import fp8, rope
from dsa_jax.model.config import IndexerConfig
from dsa_jax.model.layers import LayerNorm, param
from pallas_kernels.lightning_indexer import api as indexer_api


@dataclasses.dataclass(frozen=True)
class IndexerInputs:
  """Indexer queries, keys and head weights of one layer (w already carries every scale)."""
  q: jax.Array  # [B, T, I, H]
  k: jax.Array  # [B, S, H]
  w: jax.Array  # [B, T, I] float32


jax.tree_util.register_dataclass(IndexerInputs, data_fields=["q", "k", "w"], meta_fields=[])


class Indexer(nnx.Module):
  """Per-layer lightning indexer parameters and its q/k/w projection."""

  def __init__(self, cfg: IndexerConfig, *, hidden: int, q_lora_rank: int, rope_dim: int, rngs: nnx.Rngs,
               dtype: str, param_dtype: str, std: float, fp8_numerics: bool = False):
    self.cfg = cfg
    self.rope_dim = rope_dim
    self.dtype = dtype
    self.fp8_numerics = fp8_numerics
    self.wq_b = param(rngs, (q_lora_rank, cfg.num_heads, cfg.head_dim), ("q_lora", "index_heads", "index_dim"),
                      param_dtype, std)
    self.wk = param(rngs, (hidden, cfg.head_dim), ("embed", "index_dim"), param_dtype, std)
    self.k_norm = LayerNorm(cfg.head_dim, "index_dim", eps=1e-6, param_dtype=param_dtype)
    self.weights_proj = param(rngs, (hidden, cfg.num_heads), ("embed", "index_heads"), "float32", std)

  def project(self, x: jax.Array, q_latent: jax.Array, cos: jax.Array, sin: jax.Array) -> IndexerInputs:
    """x [B, T, D] (normed block input), q_latent [B, T, Cq] -> IndexerInputs."""
    r = self.rope_dim
    q = jnp.einsum("btc,cih->btih", q_latent.astype(self.dtype), self.wq_b[...].astype(self.dtype))
    q = jnp.concatenate([rope.apply_half_split(q[..., :r], cos, sin), q[..., r:]], axis=-1)
    k = self.k_norm(jnp.einsum("btd,dh->bth", x.astype(self.dtype), self.wk[...].astype(self.dtype)))
    k = jnp.concatenate([rope.apply_half_split(k[..., :r], cos, sin), k[..., r:]], axis=-1)
    w = jnp.einsum("btd,di->bti", x.astype(jnp.float32), self.weights_proj[...].astype(jnp.float32))
    w = w * (self.cfg.num_heads ** -0.5) * (self.cfg.head_dim ** -0.5)
    if self.fp8_numerics:
      q, q_scale = fp8.fake_quantize_e4m3(fp8.rotate(q), self.cfg.head_dim)
      k, k_scale = fp8.fake_quantize_e4m3(fp8.rotate(k), self.cfg.head_dim)
      return IndexerInputs(q=q, k=k * k_scale, w=w * q_scale[..., 0])
    return IndexerInputs(q=q.astype(self.dtype), k=k.astype(self.dtype), w=w)


def select(inputs: IndexerInputs, topk: int, *, q_positions: jax.Array, kv_positions: jax.Array,
           q_segment_ids: jax.Array, kv_segment_ids: jax.Array, implementation: str | None = None,
           fp8_numerics: bool = False) -> jax.Array:
  """Top-k visible keys per query -> int32 [B, T, min(topk, S)], ascending, -1 padded.

  fp8_numerics: the inputs are dequantised e4m3 values; scoring requantises them exactly and, with the Pallas
  implementation, runs the fp8 wgmma kernel.
  """
  return indexer_api.index_topk(inputs.q, inputs.k, inputs.w, topk=topk, q_positions=q_positions,
                                kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, implementation=implementation, fp8=fp8_numerics)
