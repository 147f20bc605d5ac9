"""Reference lightning-indexer scores (the spec; paper section 2.1, official `Indexer.forward`).

Scales: the caller folds every constant into `w` (official code: weights_proj(x) * I^-0.5 * H^-0.5, and
the FP8 q scale). ReLU is positively homogeneous, so this equals scaling inside the ReLU.

FP8 (official `act_quant` + DeepGEMM `fp8_mqa_logits`): q per (token, head) and k per token are quantised
to e4m3 with a power-of-two (ue8m0) scale. Dequantising is exact in float32, so the fp8 scores are the
ordinary scores of the dequantised tensors, with the q scale folded into w.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.visibility import visible


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, *, q_positions: jax.Array,
                 kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """q [B, T, I, H], k [B, S, H], w [B, T, I] -> scores [B, T, S] float32, -inf where not visible."""
  logits = jnp.einsum("btih,bsh->btis", q, k, preferred_element_type=jnp.float32)
  scores = jnp.einsum("btis,bti->bts", jax.nn.relu(logits), w.astype(jnp.float32))
  mask = visible(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  return jnp.where(mask, scores, -jnp.inf)


E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def quantize_e4m3(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Per-block e4m3 quantisation of the last dim with ue8m0 scales -> (fp8 values [..., H], scales [..., H/block]).

  scale = 2^ceil(log2(max(amax, 1e-4) / 448)) per block; values = x / scale, so values * scale ~ x. Exactly
  idempotent on dequantised inputs: requantising values * scale returns the same dequantised tensor.
  """
  h = x.shape[-1]
  if h % block:
    raise ValueError(f"quantisation block={block} is invalid for last dim {h}; allowed: a divisor of {h}.")
  blocks = x.astype(jnp.float32).reshape(x.shape[:-1] + (h // block, block))
  amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), AMAX_FLOOR)
  exponent = jnp.ceil(jnp.log2(amax / E4M3_MAX)).astype(jnp.int32)
  scale = jnp.ldexp(jnp.ones_like(amax), exponent)  # exactly 2^exponent (exp2 may be off by an ulp)
  values = jnp.clip(blocks / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return values.reshape(x.shape), scale


def index_scores_fp8(q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, w: jax.Array, *,
                     q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array) -> jax.Array:
  """q8 [B, T, I, H] e4m3, q_scale [B, T, I], k8 [B, S, H] e4m3, k_scale [B, S], w [B, T, I] -> [B, T, S] float32.

  I[t, s] = sum_j w[t, j] q_scale[t, j] ReLU(q8[t, j] . (k8[s] k_scale[s])) in float32, -inf where not visible.
  """
  k = k8.astype(jnp.float32) * k_scale[..., None].astype(jnp.float32)
  return index_scores(q8.astype(jnp.float32), k, w.astype(jnp.float32) * q_scale, q_positions=q_positions,
                      kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)

