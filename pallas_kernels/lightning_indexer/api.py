"""Public entry points of the lightning indexer: scores, and scores fused with top-k selection."""

import jax

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.lightning_indexer import reference
from pallas_kernels.topk import api as topk_api

AVAILABLE = ("xla",)


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
                 q_segment_ids: jax.Array, kv_segment_ids: jax.Array, implementation: str | None = None) -> jax.Array:
  """q [B, T, I, H], k [B, S, H], w [B, T, I] -> float32 scores [B, T, S], -inf where not visible."""
  resolve_implementation(implementation, AVAILABLE)
  return reference.index_scores(q, k, w, q_positions=q_positions, kv_positions=kv_positions,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


def index_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, q_positions: jax.Array,
               kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
               implementation: str | None = None) -> jax.Array:
  """Top-k keys by indexer score -> int32 [B, T, min(topk, S)], sorted ascending, -1 padded."""
  scores = index_scores(q, k, w, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, implementation=implementation)
  return topk_api.topk_indices(jax.lax.stop_gradient(scores), topk, implementation=implementation)
