"""Reference dense attention: every query over every visible key, with a float32 softmax.

The spec of `flash_attention` and the oracle of its tests. It builds the [B, N, T, S] logits and the [B, T, S]
visibility (`pallas_kernels.visibility`), so it only fits short sequences. Keys/values either carry a head axis
([B, S, N, H], MLA's MHA mode: q/k 192, v 128) or are shared by all heads ([B, S, H], MQA mode: the absorbed
latent entries, 576 / 512).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.visibility import visible


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
              q_segment_ids: jax.Array, kv_segment_ids: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Hk]; k [B, S, (N,) Hk]; v [B, S, (N,) Hv]; positions / segment ids [B, T] and [B, S]
  -> (out [B, T, N, Hv] in q's dtype, lse [B, T, N] float32).

  Key s is visible to query t iff kv_positions[s] <= q_positions[t] and the segment ids are equal. `lse` is
  the natural-log sum of exp(scale * q.k) over the visible keys; a row that sees nothing gives out 0 and
  lse -inf. The probabilities are cast to v's dtype before the value matmul (float32 accumulation).
  """
  shared = k.ndim == 3
  logits = jnp.einsum("btnh,bsh->bnts" if shared else "btnh,bsnh->bnts", q, k,
                      preferred_element_type=jnp.float32) * scale
  mask = visible(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("bnts,bsh->btnh" if shared else "bnts,bsnh->btnh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))
