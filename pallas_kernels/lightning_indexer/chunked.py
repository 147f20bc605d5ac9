"""The lightning indexer's top-k on the XLA path, a block of query rows at a time (`api.index_topk`, "xla").

Scoring every query against every key at once holds float32 logits [B, T, I, S] (128 GiB for the tiny
model's 16 index heads at T = S = 32K). Here `lax.map` visits blocks of `rows_per_block` queries: each block's
logits [B, rows, I, S], scores [B, rows, S] and top-k, so the temporaries are O(rows_per_block x I x S) and the
output [B, T, K] is the only O(T) array. Each query row goes through the same operations as in the unblocked
reference (`reference.index_scores`, then `topk.reference.topk_indices`), so the indices are bitwise the same.
"""

from collections.abc import Callable

import jax

from pallas_kernels.chunking import pad_chunks, unchunk
from pallas_kernels.topk import reference as topk_reference

BLOCK_BYTES = 2**28  # the default block's float32 logits [B, rows, I, S] and their ReLU stay under this


def default_rows_per_block(batch: int, heads: int, keys: int) -> int:
  """The most query rows whose float32 logits [batch, rows, heads, keys] and their ReLU (XLA on the CPU keeps
  both) fit in BLOCK_BYTES (at least 1)."""
  return max(1, BLOCK_BYTES // (2 * 4 * batch * heads * keys))


def index_topk(score_fn: Callable[..., jax.Array], rows: tuple[jax.Array, ...], keys: tuple[jax.Array, ...], *,
               topk: int, q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
               kv_segment_ids: jax.Array, rows_per_block: int | None = None) -> jax.Array:
  """Top-k keys by `score_fn` -> int32 [B, T, min(topk, S)], sorted ascending, -1 padded.

  rows: the query-indexed arguments [B, T, ...], the first one [B, T, I, H] (the queries); keys: the key-indexed
  ones [B, S, ...]. score_fn(*rows, *keys, q_positions=, kv_positions=, q_segment_ids=, kv_segment_ids=) ->
  float32 scores [B, rows, S], -inf where not visible. rows_per_block: None picks `default_rows_per_block`;
  T need not be a multiple (the last block is padded).
  """
  batch, t, heads = rows[0].shape[:3]
  if rows_per_block is None:
    rows_per_block = default_rows_per_block(batch, heads, kv_positions.shape[1])
  rows_per_block = min(rows_per_block, t)

  def block_topk(args):
    *row_block, q_pos, q_seg = args
    scores = score_fn(*row_block, *keys, q_positions=q_pos, kv_positions=kv_positions, q_segment_ids=q_seg,
                      kv_segment_ids=kv_segment_ids)
    return topk_reference.topk_indices(scores, topk)

  blocks = tuple(pad_chunks(x, rows_per_block) for x in (*rows, q_positions, q_segment_ids))
  return unchunk(jax.lax.map(block_topk, blocks), t)
