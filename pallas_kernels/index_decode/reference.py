"""Reference indexer decode: lightning-indexer scores of decode rows over a paged key cache, and their top-k (the
spec; DeepSeek-V3.2 paper section 2.1, official `Indexer.forward` in decoding, whose keys come from the FP8
indexer cache and whose selection is `topk(index_score, k)`).

Each of the Q query rows (B sequences x Tq rows: 1 in plain decoding, 2 in MTP verification) sees the first
lengths[q] logical positions of its own sequence. Logical position p lives in row
  block_table[q, p // page_size] * page_size + p % page_size
of the key pool (the pool's [P, page_size, H] pages flattened to [P * page_size, H]; docs: the decode contract,
issue 23). Keys are float8_e4m3fn with one float32 scale per token, or bf16 without scales; q is bf16, or
float8_e4m3fn with one float32 scale per (row, head). With those
  score[q, p] = sum_j weights[q, j] * relu(q[q, j] . k[p] * q_scale[q, j] * k_scale[p])   for p < lengths[q].
Every fp8 and bf16 value is exact in bfloat16, so the dot products run on bf16 operands with float32
accumulation: the products are exact and only the float32 sums round.

Selection: the k largest scores of each row (`topk.reference`: exact, ties to the lower position), returned as
ascending logical positions, -1 in the slots beyond the visible count, with their scores (-inf in those slots).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.topk import reference as topk_reference


def visible_pages(block_table: jax.Array, lengths: jax.Array, page_size: int, num_pages: int) -> jax.Array:
  """block_table [Q, max_pages], lengths [Q] -> int32 [Q, max_pages]: the pool page of every logical page. Pages
  past a row's length are never scored (their entries may be stale): they map to the row's last visible page, a
  real page (page 0 for an empty row), and every entry is clamped into [0, num_pages)."""
  max_pages = block_table.shape[1]
  last = jnp.clip((lengths - 1) // page_size, 0, max_pages - 1)  # [Q]
  page_of = jnp.minimum(jnp.arange(max_pages), last[:, None])  # [Q, max_pages]
  return jnp.clip(jnp.take_along_axis(block_table, page_of, axis=1), 0, num_pages - 1).astype(jnp.int32)


def physical_rows(block_table: jax.Array, lengths: jax.Array, page_size: int, num_pages: int) -> jax.Array:
  """-> int32 [Q, max_pages * page_size]: the pool row of every logical position (`visible_pages`)."""
  rows = visible_pages(block_table, lengths, page_size, num_pages)[:, :, None] * page_size + jnp.arange(page_size)
  return rows.reshape(block_table.shape[0], -1)


def index_decode_scores(q: jax.Array, q_scale: jax.Array | None, weights: jax.Array, idx_k: jax.Array,
                        idx_scale: jax.Array | None, block_table: jax.Array, lengths: jax.Array, *,
                        page_size: int) -> jax.Array:
  """q [Q, I, H], q_scale [Q, I] | None, weights [Q, I], idx_k [R_pool, H], idx_scale [R_pool] | None,
  block_table [Q, max_pages], lengths [Q] -> float32 scores [Q, max_pages * page_size], -inf where p >= lengths."""
  rows = physical_rows(block_table, lengths, page_size, idx_k.shape[0] // page_size)
  k = idx_k[rows].astype(jnp.bfloat16)  # [Q, S, H]: exact for e4m3 and bf16
  logits = jnp.einsum("qih,qsh->qis", q.astype(jnp.bfloat16), k, preferred_element_type=jnp.float32)
  if q_scale is not None:
    logits = logits * q_scale.astype(jnp.float32)[:, :, None]
  if idx_scale is not None:
    logits = logits * idx_scale.astype(jnp.float32)[rows][:, None, :]
  scores = jnp.einsum("qis,qi->qs", jax.nn.relu(logits), weights.astype(jnp.float32))
  visible = jnp.arange(rows.shape[1]) < lengths[:, None]
  return jnp.where(visible, scores, -jnp.inf)


def select(scores: jax.Array, k: int, topk_fn=topk_reference.topk_indices) -> tuple[jax.Array, jax.Array]:
  """scores [Q, S] (-inf: not visible) -> (int32 [Q, k] ascending positions, -1 padded; float32 [Q, k] their
  scores, -inf where -1), by `topk_fn(scores, k)` (any implementation of the `topk.reference` contract)."""
  indices = topk_fn(scores, k)
  indices = jnp.pad(indices, ((0, 0), (0, k - indices.shape[1])), constant_values=-1)  # k > S: pad
  picked = jnp.take_along_axis(scores, jnp.maximum(indices, 0), axis=1)
  return indices, jnp.where(indices >= 0, picked, -jnp.inf)


def index_decode_topk(q: jax.Array, q_scale: jax.Array | None, weights: jax.Array, idx_k: jax.Array,
                      idx_scale: jax.Array | None, block_table: jax.Array, lengths: jax.Array, *, k: int,
                      page_size: int) -> tuple[jax.Array, jax.Array]:
  """`index_decode_scores`, then `select` with `lax.top_k` -> (indices [Q, k], scores [Q, k])."""
  return select(index_decode_scores(q, q_scale, weights, idx_k, idx_scale, block_table, lengths,
                                    page_size=page_size), k)
