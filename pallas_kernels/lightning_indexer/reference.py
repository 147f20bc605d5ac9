"""Reference lightning-indexer scores (the spec; paper section 2.1, official `Indexer.forward`).

Scales: the caller folds every constant into `w` (official code: weights_proj(x) * I^-0.5 * H^-0.5, and
the FP8 q scale). ReLU is positively homogeneous, so this equals scaling inside the ReLU.
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
