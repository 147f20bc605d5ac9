"""Dense attention core with float32 softmax, for MLA's MHA mode and its dense MQA mode.

Keys/values either carry a head axis ([B, S, N, H], MHA mode) or are shared by all heads ([B, S, H], MQA
mode, the absorbed latent entries). Returns the log-sum-exp as well: the indexer's KL target (spec
section 2) is recomputed from it.
"""

import jax
import jax.numpy as jnp


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    scale: float) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Hk]; k [B, S, (N,) Hk]; v [B, S, (N,) Hv]; mask [B, T, S] -> (out [B, T, N, Hv], lse [B, T, N])."""
  shared = k.ndim == 3
  logits = jnp.einsum("btnh,bsh->bnts" if shared else "btnh,bsnh->bnts", q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("bnts,bsh->btnh" if shared else "bnts,bsnh->btnh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))
