"""Public entry points of the lightning indexer: scores, and scores fused with top-k selection.

Implementations: "xla" (`reference.py`) and "pallas" (`kernel.py`, Mosaic GPU; forward only, its backward
is `jax.vjp` of the reference, which materialises [B, T, I, S] logits: fine for the short sequences of the
indexer warm-up tests, not for 128K training, where `pallas_kernels.indexer_kl` computes the loss instead).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.lightning_indexer import kernel, reference
from pallas_kernels.topk import api as topk_api

AVAILABLE = ("xla", "pallas")
_PAD_POSITION = jnp.iinfo(jnp.int32).max  # a padded key is later than every query, so never visible
_SCORE_BLOCK_BYTES = 2**31  # index_topk materialises at most this many bytes of scores at a time


def _kernel_supports(q: jax.Array) -> bool:
  """The kernel computes in bf16 with 64-wide wgmma tiles: automatic choice only for bf16 and H % 64 == 0."""
  return q.dtype == jnp.bfloat16 and q.shape[-1] % 64 == 0


@jax.custom_vjp
def _pallas_scores(q, k, w, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
  T, S = q.shape[1], k.shape[1]  # noqa: N806
  pad_t, pad_s = -T % kernel.BLOCK_T, -S % kernel.BLOCK_S
  pad = lambda x, n, value=0: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  scores = kernel.index_scores(
      pad(q, pad_t), pad(k, pad_s), pad(w, pad_t), q_positions=pad(q_positions, pad_t),
      kv_positions=pad(kv_positions, pad_s, _PAD_POSITION), q_segment_ids=pad(q_segment_ids, pad_t),
      kv_segment_ids=pad(kv_segment_ids, pad_s))
  return scores[:, :T, :S]


def _pallas_scores_fwd(q, k, w, *visibility):
  return _pallas_scores(q, k, w, *visibility), (q, k, w, visibility)


def _pallas_scores_bwd(residuals, d_scores):
  q, k, w, visibility = residuals
  names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")
  _, vjp = jax.vjp(functools.partial(reference.index_scores, **dict(zip(names, visibility))), q, k, w)
  return (*vjp(d_scores), None, None, None, None)


_pallas_scores.defvjp(_pallas_scores_fwd, _pallas_scores_bwd)


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
                 q_segment_ids: jax.Array, kv_segment_ids: jax.Array, implementation: str | None = None) -> jax.Array:
  """q [B, T, I, H], k [B, S, H], w [B, T, I] -> float32 scores [B, T, S], -inf where not visible."""
  visibility = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(q)) == "pallas":
    return _pallas_scores(q, k, w, *visibility)
  return reference.index_scores(q, k, w, q_positions=q_positions, kv_positions=kv_positions,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


def index_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, q_positions: jax.Array,
               kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
               implementation: str | None = None, rows_per_block: int | None = None,
               select_implementation: str = "xla") -> jax.Array:
  """Top-k keys by indexer score -> int32 [B, T, min(topk, S)], sorted ascending, -1 padded.

  "pallas" computes the scores of `rows_per_block` queries at a time with the Mosaic GPU kernel and selects
  with `topk.api.topk_indices(implementation=select_implementation)`, so at most B x rows_per_block x S float32 scores exist at once (default: 2 GiB),
  never [B, T, S]. The default selection is lax.top_k: the radix select ran 20x slower inside this
  lax.map on the H200 (see `topk/kernel.py`). "xla" is the reference path (materialises [B, T, S]).
  """
  q, k, w = jax.tree.map(jax.lax.stop_gradient, (q, k, w))  # indices are discrete: no gradient
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(q)) == "xla":
    scores = reference.index_scores(q, k, w, q_positions=q_positions, kv_positions=kv_positions,
                                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    return topk_api.topk_indices(scores, topk, implementation="xla")
  B, T = q.shape[:2]  # noqa: N806
  S = k.shape[1]  # noqa: N806
  if rows_per_block is None:
    rows_per_block = max(kernel.BLOCK_T, _SCORE_BLOCK_BYTES // (4 * B * S) // kernel.BLOCK_T * kernel.BLOCK_T)
  rows_per_block = min(rows_per_block, T)
  n_blocks = -(-T // rows_per_block)
  pad_t = n_blocks * rows_per_block - T
  split = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad_t)] + [(0, 0)] * (x.ndim - 2)).reshape(
      B, n_blocks, rows_per_block, *x.shape[2:]), 1, 0)

  def block_topk(args):
    q_b, w_b, q_pos_b, q_seg_b = args
    scores = _pallas_scores(q_b, k, w_b, q_pos_b, kv_positions, q_seg_b, kv_segment_ids)
    return topk_api.topk_indices(scores, topk, implementation=select_implementation)

  blocks = jax.lax.map(block_topk, (split(q), split(w), split(q_positions), split(q_segment_ids)))
  return jnp.moveaxis(blocks, 0, 1).reshape(B, n_blocks * rows_per_block, -1)[:, :T]
