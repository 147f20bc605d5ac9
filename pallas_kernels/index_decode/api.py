"""Public entry point of the indexer decode: scores of the decode rows over their paged key cache, fused with
the top-k selection (DeepSeek-V3.2's indexer at decoding time; interface: the decode contract of issue 23).

"xla": `reference.py` (gathered keys, einsum, `lax.top_k`). "pallas": the Mosaic GPU scores kernel (`kernel.py`,
split over keys) into a [Q, S] float32 buffer, masked by position, then the exact pruned top-k of
`topk.api.topk_indices(implementation="pallas")`. The buffer costs 4 bytes written and read per key against
the 132 bytes of an FP8 key read. None picks "pallas" on a GPU for shapes the kernel takes, else "xla".
Forward only: indices are discrete. Today's figure: none measured yet (benchmarks/decode.md).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.index_decode import kernel, reference
from pallas_kernels.topk import api as topk_api

AVAILABLE = ("xla", "pallas")


def _kernel_supports(q: jax.Array, idx_k: jax.Array, idx_scale: jax.Array | None, page_size: int) -> bool:
  """The kernel takes bf16 or e4m3 q and keys of one dtype, H % 64 == 0 and its page sizes."""
  return (q.dtype == idx_k.dtype and q.dtype in (jnp.bfloat16, jnp.float8_e4m3fn) and q.shape[-1] % 64 == 0
          and kernel.page_size_ok(page_size, idx_scale is not None))


def _check(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, k, page_size):
  num_rows, heads, dim = q.shape
  expected = dict(q_scale=None if q_scale is None else (num_rows, heads), weights=(num_rows, heads),
                  idx_k=(idx_k.shape[0], dim), idx_scale=None if idx_scale is None else (idx_k.shape[0],),
                  block_table=(num_rows, block_table.shape[1]), lengths=(num_rows,))
  given = dict(q_scale=q_scale, weights=weights, idx_k=idx_k, idx_scale=idx_scale, block_table=block_table,
               lengths=lengths)
  for name, shape in expected.items():
    if shape is not None and given[name].shape != shape:
      raise ValueError(f"index_decode: {name} has shape {given[name].shape}; allowed: {shape} for q "
                       f"{q.shape} [Q, I, H] and idx_k {idx_k.shape} [R_pool, H].")
  if q.dtype == jnp.float8_e4m3fn and q_scale is None:
    raise ValueError("index_decode: q is float8_e4m3fn without q_scale; allowed: fp8 q with q_scale [Q, I], "
                     "or bf16 q.")
  if k < 1 or page_size < 1 or idx_k.shape[0] % page_size:
    raise ValueError(f"index_decode: k={k}, page_size={page_size} with {idx_k.shape[0]} pool rows; allowed: "
                     "k >= 1 and a page size that divides the pool rows.")


def _implementation(implementation, q, idx_k, idx_scale, page_size) -> str:
  """The implementation to run; an explicit "pallas" for inputs the kernel does not take is an error."""
  supported = _kernel_supports(q, idx_k, idx_scale, page_size)
  chosen = resolve_implementation(implementation, AVAILABLE, supported)
  if chosen == "pallas" and not supported:
    raise ValueError(f"index_decode(implementation='pallas'): q {q.dtype} {q.shape}, idx_k {idx_k.dtype}, "
                     f"page_size={page_size}; allowed: q and idx_k both bfloat16 or both float8_e4m3fn, H a "
                     f"multiple of 64, page_size a multiple of 8 (of 32 with key scales) dividing {kernel.TILE} or a multiple "
                     "of it.")
  return chosen


def _pallas_scores(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, page_size):
  """The kernel's scores [Q, max_pages * page_size], -inf past each row's length."""
  w = weights.astype(jnp.float32)
  if q_scale is not None:  # positive scales commute with ReLU: folded into the head weights
    w = w * q_scale.astype(jnp.float32)
  pad = -q.shape[1] % kernel.HEAD_ALIGN  # zero heads with zero weight add nothing
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
  w = jnp.pad(w, ((0, 0), (0, pad)))
  pages = reference.visible_pages(block_table, lengths, page_size, idx_k.shape[0] // page_size)
  num_keys = block_table.shape[1] * page_size
  scores = kernel.index_decode_scores(q, w, idx_k, idx_scale, kernel.tile_rows(pages, page_size, idx_scale is not None), lengths,
                                      page_size=page_size)[:, :num_keys]
  return jnp.where(jnp.arange(num_keys) < lengths[:, None], scores, -jnp.inf)


def index_decode_topk(q: jax.Array, q_scale: jax.Array | None, weights: jax.Array, idx_k: jax.Array,
                      idx_scale: jax.Array | None, block_table: jax.Array, lengths: jax.Array, *, k: int,
                      page_size: int, implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Top-k logical positions of each decode row by indexer score -> (indices int32 [Q, k], scores float32 [Q, k]).

  q [Q, I, H] bf16, or float8_e4m3fn with q_scale [Q, I] float32 (else None); weights [Q, I] float32;
  idx_k [R_pool, H] float8_e4m3fn with idx_scale [R_pool] float32, or bf16 with None; block_table [Q, max_pages]
  int32 (pool page of each logical page); lengths [Q] int32 (row q sees logical positions 0 .. lengths[q] - 1).
  score[p] = sum_j weights[j] relu(q[j] . k[p] q_scale[j] k_scale[p]). Indices are ascending logical positions of
  the k best scores (exact; among equal scores the lower position is taken), -1 in the slots beyond the visible
  count (scores -inf there); the caller maps them to pool rows through the block table. CPU tests run the
  "pallas" path under `plgpu.force_gpu_interpret_mode`.
  """
  _check(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, k, page_size)
  if _implementation(implementation, q, idx_k, idx_scale, page_size) == "xla":
    return reference.index_decode_topk(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, k=k,
                                       page_size=page_size)
  scores = _pallas_scores(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, page_size)
  return reference.select(scores, k, lambda s, n: topk_api.topk_indices(s, n, implementation="pallas"))


def index_decode_scores(q: jax.Array, q_scale: jax.Array | None, weights: jax.Array, idx_k: jax.Array,
                        idx_scale: jax.Array | None, block_table: jax.Array, lengths: jax.Array, *, page_size: int,
                        implementation: str | None = None) -> jax.Array:
  """The scores alone, as `index_decode_topk` computes them -> float32 [Q, max_pages * page_size], -inf where
  p >= lengths[q]."""
  _check(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, 1, page_size)
  if _implementation(implementation, q, idx_k, idx_scale, page_size) == "xla":
    return reference.index_decode_scores(q, q_scale, weights, idx_k, idx_scale, block_table, lengths,
                                         page_size=page_size)
  return _pallas_scores(q, q_scale, weights, idx_k, idx_scale, block_table, lengths, page_size)
