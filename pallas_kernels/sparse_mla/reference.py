"""Reference sparse MLA attention: each query attends to its own selected latent entries.

MQA mode (spec section 1): every key is a shared 576-dim entry [c (512) | k_rope (64)], the value is its
first `v_dim` dims (the latent c), and all heads of a query share that query's selected set. This
gathers the [T, K] selected rows; it never forms a [T, S] mask.
"""

import jax
import jax.numpy as jnp


def sparse_mla(q: jax.Array, kv: jax.Array, indices: jax.Array, *, scale: float,
               v_dim: int) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Dk], kv [B, S, Dk], indices [B, T, K] (-1 = skip) -> (out [B, T, N, v_dim], lse [B, T, N]).

  Softmax in float32; `lse` is the natural-log sum of exp(scale * q.k) over the valid selected keys
  (-inf and a zero output for a row with none).
  """
  valid = indices >= 0
  gathered = jax.vmap(lambda rows, idx: rows[idx])(kv, jnp.where(valid, indices, 0))  # [B, T, K, Dk]
  logits = jnp.einsum("btnd,btkd->btnk", q, gathered, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("btnk,btkd->btnd", probs.astype(kv.dtype), gathered[..., :v_dim],
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype), lse
