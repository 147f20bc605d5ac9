"""Mosaic GPU kernel for FP8 lightning-indexer scores (official `Indexer.forward` with DeepGEMM's `fp8_mqa_logits`).

I[t,s] = sum_j w[t,j] q_scale[t,j] ReLU(q8[t,j] . k8[s] k_scale[s]) with e4m3 q8 (one ue8m0 scale per token
and head) and e4m3 k8 (one per token), as `reference.index_scores_fp8`. It runs `kernel.py`'s bodies, tiles
(64 x 128 or 64 x 256 scores per CTA) and masked-tile skipping unchanged, with the e4m3 tiles fed straight to Hopper's
fp8 wgmma (e4m3 x e4m3 -> fp32, twice the bf16 rate; fp8 operands must be K-major, which q [t, h] and
k [s, h] rows are; 128-byte swizzle for H = 128):
- the q scale is folded into w outside the kernel (as the official code folds it into the head weights);
- the k scale, a positive power of two, multiplies each score column once in the final epilogue: it commutes
  exactly with ReLU, w and the head sum, so only the fp32 summation order differs from the reference.
Hopper accumulates fp8 wgmma products with about 14 mantissa bits (DeepSeek-V3 paper section 3.3.2), so DeepGEMM
promotes to fp32 every K = 128; here each head's logits are one K = H = 128 wgmma chain, promoted by the fp32
register sum over heads: the same granularity. Today's figure (4096 x 128K, V3.2 shapes, H200): about 1100 TF/s,
benchmarks/index_topk.md.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.lightning_indexer import kernel


def index_scores_fp8(q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, w: jax.Array, *,
                     q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, interpret=None, key_warpgroups: int | None = None) -> jax.Array:
  """q8 [B, T, I, H] e4m3, q_scale [B, T, I], k8 [B, S, H] e4m3, k_scale [B, S], w [B, T, I] -> float32 [B, T, S].

  T must be a multiple of 64 and S of 128 x key_warpgroups (the API pads); key_warpgroups as `kernel.launch`.
  """
  if q8.dtype != jnp.float8_e4m3fn or k8.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"q8 and k8 must be float8_e4m3fn; got q8 {q8.dtype}, k8 {k8.dtype}.")
  return kernel.launch(q8, k8, w.astype(jnp.float32) * q_scale, k_scale, q_positions=q_positions,
                       kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       interpret=interpret, key_warpgroups=key_warpgroups)
