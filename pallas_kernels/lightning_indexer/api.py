"""Public entry points of the lightning indexer: scores, and scores fused with top-k selection.

Implementations: "xla" (`reference.py`) and "pallas" (`kernel.py`, Mosaic GPU; forward only, its backward
is `jax.vjp` of the reference, which materialises [B, T, I, S] logits: fine for short sequences, not for 128K
training, where `pallas_kernels.indexer_kl` computes the loss and its gradients instead).
FP8 (the official numerics): `quantize_fp8`, `index_scores_fp8` (`kernel_fp8.py`, forward only: its scores
feed selection) and `index_topk(fp8=True)`.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.lightning_indexer import chunked, kernel, kernel_fp8, reference
from pallas_kernels.topk import api as topk_api

AVAILABLE = ("xla", "pallas")
_PAD_POSITION = jnp.iinfo(jnp.int32).max  # a padded key is later than every query, so never visible
_SCORE_BLOCK_BYTES = 2**31  # index_topk materialises at most this many bytes of scores at a time


def _kernel_supports(q: jax.Array) -> bool:
  """The kernels take bf16 or e4m3 with 64-wide wgmma tiles: automatic choice only for those and H % 64 == 0."""
  return q.dtype in (jnp.bfloat16, jnp.float8_e4m3fn) and q.shape[-1] % 64 == 0


def _call_padded(fn, t_args: dict, s_args: dict):
  """fn(**t_args, **s_args) with the T- and S-indexed arguments padded to the kernels' tiles; unpadded scores."""
  T, S = t_args["q_positions"].shape[1], s_args["kv_positions"].shape[1]  # noqa: N806
  pad_t, pad_s = -T % kernel.BLOCK_T, -S % kernel.KEY_ALIGN
  pad = lambda x, n, value=0: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  scores = fn(**{name: pad(x, pad_t) for name, x in t_args.items()},
              **{name: pad(x, pad_s, _PAD_POSITION if name == "kv_positions" else 0) for name, x in s_args.items()})
  return scores[:, :T, :S]


@jax.custom_vjp
def _pallas_scores(q, k, w, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
  return _call_padded(kernel.index_scores, dict(q=q, w=w, q_positions=q_positions, q_segment_ids=q_segment_ids),
                      dict(k=k, kv_positions=kv_positions, kv_segment_ids=kv_segment_ids))


def _pallas_scores_fwd(q, k, w, *visibility):
  return _pallas_scores(q, k, w, *visibility), (q, k, w, visibility)


def _pallas_scores_bwd(residuals, d_scores):
  q, k, w, visibility = residuals
  names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")
  _, vjp = jax.vjp(functools.partial(reference.index_scores, **dict(zip(names, visibility))), q, k, w)
  return (*vjp(d_scores), None, None, None, None)


_pallas_scores.defvjp(_pallas_scores_fwd, _pallas_scores_bwd)


def _pallas_scores_fp8(q8, q_scale, k8, k_scale, w, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
  return _call_padded(kernel_fp8.index_scores_fp8,
                      dict(q8=q8, q_scale=q_scale, w=w, q_positions=q_positions, q_segment_ids=q_segment_ids),
                      dict(k8=k8, k_scale=k_scale, kv_positions=kv_positions, kv_segment_ids=kv_segment_ids))


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
                 q_segment_ids: jax.Array, kv_segment_ids: jax.Array, implementation: str | None = None) -> jax.Array:
  """q [B, T, I, H], k [B, S, H], w [B, T, I] -> float32 scores [B, T, S], -inf where not visible."""
  visibility = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(q)) == "pallas":
    return _pallas_scores(q, k, w, *visibility)
  return reference.index_scores(q, k, w, q_positions=q_positions, kv_positions=kv_positions,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


def quantize_fp8(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """q [B, T, I, H], k [B, S, H] -> (q8 e4m3, q_scale [B, T, I], k8 e4m3, k_scale [B, S]): one ue8m0 scale per row."""
  q8, q_scale = reference.quantize_e4m3(q, q.shape[-1])
  k8, k_scale = reference.quantize_e4m3(k, k.shape[-1])
  return q8, q_scale[..., 0], k8, k_scale[..., 0]


def index_scores_fp8(q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, w: jax.Array, *,
                     q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, implementation: str | None = None) -> jax.Array:
  """FP8 scores (`reference.index_scores_fp8`; inputs from `quantize_fp8`) -> float32 [B, T, S]. Forward only."""
  visibility = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids)
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(q8)) == "pallas":
    return _pallas_scores_fp8(q8, q_scale, k8, k_scale, w, **visibility)
  return reference.index_scores_fp8(q8, q_scale, k8, k_scale, w, **visibility)


def keys_precede_queries(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                         kv_segment_ids: jax.Array) -> jax.Array:
  """bool scalar: no query t can see a key j > t (the queries are the keys' own tokens, positions rise strictly
  inside each segment, and each segment is one contiguous run): self-attention over packed documents.

  A sufficient check in O(T log T): then key j > t is either in another segment or at a later position.
  """
  if q_positions.shape != kv_positions.shape:
    return jnp.array(False)
  pos, seg = kv_positions, kv_segment_ids
  changes = seg[:, 1:] != seg[:, :-1]
  rising = jnp.all(changes | (pos[:, 1:] > pos[:, :-1]))
  sorted_seg = jnp.sort(seg, axis=-1)
  contiguous = jnp.all(changes.sum(-1) == (sorted_seg[:, 1:] != sorted_seg[:, :-1]).sum(-1))
  same = jnp.array_equal(q_positions, pos) & jnp.array_equal(q_segment_ids, seg)
  return same & rising & contiguous


# Key-prefix stages of index_topk's causal path (see `index_topk`); at most one per row block. More stages write and
# select fewer scores (the fraction tends to 1/2) but each compiles its own scores and selection kernels.
CAUSAL_STAGES = 32


def index_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, q_positions: jax.Array,
               kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
               implementation: str | None = None, rows_per_block: int | None = None,
               select_implementation: str = "pallas", fp8: bool = False,
               causal_prefix: bool | None = None) -> jax.Array:
  """Top-k keys by indexer score -> int32 [B, T, min(topk, S)], sorted ascending, -1 padded.

  "pallas" computes the scores of `rows_per_block` queries at a time with the Mosaic GPU kernel and selects
  with `topk.api.topk_indices(implementation=select_implementation)` (default: the exact pruned select of
  `topk/pruned.py`; "xla" selects with `lax.top_k`), so at most B x rows_per_block x S float32 scores exist at
  once (default: 2 GiB), never [B, T, S]. "xla" scores and selects in row blocks too (`chunked.py`). Today's figure
  (T = 128K, V3.2 shapes, H200): about 1.25x the bf16 matmul floor, benchmarks/index_topk.md.
  fp8: quantise q and k with `quantize_fp8` and score in FP8 (`index_scores_fp8`). Exact on inputs that are
  already dequantised e4m3 values (the model's `fp8_numerics`): requantising them changes nothing.
  causal_prefix: when no query t sees a key j > t (`keys_precede_queries`), a row block ending at query r only
  needs the first r keys: the blocks run in CAUSAL_STAGES stages, each scoring and selecting over the key prefix
  its last block needs, instead of all S keys (about 52% of the scores written and rows selected). Same result.
  None: checked on the data (a `lax.cond` between both paths); True: the caller guarantees it; False: always all
  S keys.
  """
  q, k, w = jax.tree.map(jax.lax.stop_gradient, (q, k, w))  # indices are discrete: no gradient
  if fp8:
    q8, q_scale, k8, k_scale = quantize_fp8(q, k)
    rows, keys = (q8, q_scale, w), (k8, k_scale)  # the query- and key-indexed arguments
    pallas = lambda q8, q_scale, w, k8, k_scale, **vis: _pallas_scores_fp8(q8, q_scale, k8, k_scale, w, **vis)
    xla = lambda q8, q_scale, w, k8, k_scale, **vis: reference.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis)
  else:
    rows, keys = (q, w), (k,)
    pallas = lambda q, w, k, **vis: _pallas_scores(q, k, w, **vis)
    xla = lambda q, w, k, **vis: reference.index_scores(q, k, w, **vis)
  vis = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
             kv_segment_ids=kv_segment_ids)
  if resolve_implementation(implementation, AVAILABLE, _kernel_supports(rows[0])) == "xla":
    return chunked.index_topk(xla, rows, keys, topk=topk, **vis)
  B, T = q.shape[:2]  # noqa: N806
  S = k.shape[1]  # noqa: N806
  if rows_per_block is None:
    rows_per_block = max(kernel.BLOCK_T, _SCORE_BLOCK_BYTES // (4 * B * S) // kernel.BLOCK_T * kernel.BLOCK_T)
  rows_per_block = min(rows_per_block, T)
  n_blocks = -(-T // rows_per_block)
  pad_t = n_blocks * rows_per_block - T
  split = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad_t)] + [(0, 0)] * (x.ndim - 2)).reshape(
      B, n_blocks, rows_per_block, *x.shape[2:]), 1, 0)
  blocked = tuple(split(x) for x in (*rows, q_positions, q_segment_ids))
  k_out = min(topk, S)

  def blocks_topk(first: int, last: int, width: int) -> jax.Array:
    """Blocks [first, last) over the first `width` keys -> [last - first, B, rows_per_block, k_out]."""
    prefix = lambda x: x[:, :width]
    stage_keys = tuple(prefix(x) for x in keys)
    stage_vis = dict(kv_positions=prefix(kv_positions), kv_segment_ids=prefix(kv_segment_ids))

    def block_topk(args):
      *rows_b, q_pos_b, q_seg_b = args
      scores = pallas(*rows_b, *stage_keys, q_positions=q_pos_b, q_segment_ids=q_seg_b, **stage_vis)
      return topk_api.topk_indices(scores, topk, implementation=select_implementation)

    idx = jax.lax.map(block_topk, tuple(x[first:last] for x in blocked))
    return jnp.pad(idx, [(0, 0)] * 3 + [(0, k_out - idx.shape[-1])], constant_values=-1)

  def staged():
    bounds = sorted({round(i * n_blocks / CAUSAL_STAGES) for i in range(CAUSAL_STAGES + 1)})
    widths = [min(S, -(-last * rows_per_block // kernel.KEY_ALIGN) * kernel.KEY_ALIGN) for last in bounds[1:]]
    return jnp.concatenate([blocks_topk(a, b, width) for a, b, width in zip(bounds, bounds[1:], widths)])

  full = lambda: blocks_topk(0, n_blocks, S)
  if causal_prefix is False or n_blocks == 1 or S != T:
    blocks = full()
  elif causal_prefix:
    blocks = staged()
  else:
    blocks = jax.lax.cond(keys_precede_queries(q_positions, kv_positions, q_segment_ids, kv_segment_ids),
                          staged, full)
  return jnp.moveaxis(blocks, 0, 1).reshape(B, n_blocks * rows_per_block, -1)[:, :T]
