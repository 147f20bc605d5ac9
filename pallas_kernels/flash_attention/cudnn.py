"""cuDNN flash attention (GPU) for MLA's MHA mode, documents given as runs of segment ids.

Through jax's private `jax._src.cudnn.fused_attention_stablehlo` (jax 0.11.2): the public
`jax.nn.dot_product_attention(implementation="cudnn")` needs equal q and v head dims (MLA has 192 / 128) and
takes no packed documents. What cuDNN accepts there (checked by jax at trace time):
  * bf16 / fp16 q, k, v of one dtype; q and k head dims equal, <= 256 on Hopper and a multiple of 8; a v
    head dim that differs (MLA) needs cuDNN >= 9.10 and Hopper. MQA mode's 576 / 512 exceed the limit, so
    shared keys run here only at small head dims (as one key/value head); the model's MQA mode uses
    `chunked` on the GPU.
  * masks by index, not by positions: CAUSAL is causal inside each packed sequence. Packed documents are
    `q_seqlen` / `kv_seqlen` [B, M] and `q_offsets` / `kv_offsets` [B, M + 1] (segment starts; Hopper,
    cuDNN >= 9.6); M (`max_segments`) is static.
  * the softmax statistics come back as the logsumexp (natural log) in float32, shaped [B * M, N, T]: one row of
    T per packed sequence, token i of sequence g at [g, :, i] (not ragged, unlike q and the output).
  * jax's own backward drops the lse cotangent; here the caller (`api`) runs the chunked backward when it is
    nonzero.

So cuDNN computes `reference.attention` only when the queries are the keys in index order (or the last T of
them, in one document: a chunk of queries with the keys up to its last query, `dsa_jax.model.mla`'s query
chunks), each document one run of equal segment ids with increasing positions: `layout_ok` checks that at run
time, and `api` falls back to the chunked XLA path where it fails (a decode cache, a context-parallel
permutation, more than `max_segments` runs in a row).

Each row is passed as exactly M sequences (empty ones of length 0 at the row's end), so the statistics of run r
of row b sit at [b * M + r] whatever the batch sharding: jax compacts the sequences of each shard on its own,
which breaks a global running count but not this fixed stride. The cost is memory, which is why M defaults to
1 (rows of one document; packed rows run `chunked`): the statistics hold B * M * N * T floats, and cuDNN's
backward a float32 dq accumulator of B * M * T * N * Hk (see DEFAULT_MAX_SEGMENTS).
"""

import jax
import jax.numpy as jnp

from jax._src.cudnn import fused_attention_stablehlo as _cudnn  # private: MLA head dims, packing, statistics

MAX_HEAD_DIM = 256
# One document a row by default: cuDNN's backward over a packed layout keeps a float32 dq accumulator per packed
# sequence, B * M * T * N * Hk floats (M = 64 at T = 32K: it asked for 196 GiB on the H200), while a row of one
# document needs B * T * N * Hk (12 GiB at 128K). Rows of several documents then run the chunked path.
DEFAULT_MAX_SEGMENTS = 1
_DTYPES = (jnp.bfloat16, jnp.float16)
_LAYOUT = _cudnn.AttentionLayout.BTNH.value


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
  """Why cuDNN cannot take these shapes and dtypes, or None when it can."""
  hk, hv = q.shape[-1], v.shape[-1]
  if not (q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES):
    return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: cuDNN needs one of bfloat16 / float16"
  if q.shape[1] > k.shape[1]:
    return f"T={q.shape[1]} > S={k.shape[1]}: cuDNN's causal mask needs the queries to be the last T keys"
  if max(hk, hv) > MAX_HEAD_DIM or hk % 8 or hv % 8:
    return f"head dims {hk} / {hv}: cuDNN needs multiples of 8 <= {MAX_HEAD_DIM}"
  return None


def layout_ok(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
              max_segments: int = DEFAULT_MAX_SEGMENTS) -> jax.Array:
  """bool scalar: cuDNN's index-causal mask per run equals the position/segment rule in every row.

  Holds when the queries are the last T of the S keys (equal positions and ids; T == S in training, T < S for a
  chunk of queries with the keys up to its last query), every segment id forms one run, positions increase
  strictly along each run, and no row has more than `max_segments` runs (one run when T < S: `forward` splits
  the keys into the causal tail and the fully visible past, which holds only inside one document).
  """
  t, s = q_positions.shape[-1], kv_positions.shape[-1]
  if q_positions.shape[:-1] != kv_positions.shape[:-1] or t > s:
    return jnp.asarray(False)
  same = jnp.all(q_positions == kv_positions[:, s - t:]) & jnp.all(q_segment_ids == kv_segment_ids[:, s - t:])
  seg, pos = kv_segment_ids, kv_positions
  inside = seg[:, 1:] == seg[:, :-1]
  increasing = jnp.all(~inside | (pos[:, 1:] > pos[:, :-1]))
  runs = 1 + jnp.sum(~inside, axis=1)
  ordered = jnp.sort(seg, axis=1)
  distinct = 1 + jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
  return same & increasing & jnp.all(runs == distinct) & jnp.all(runs <= (max_segments if t == s else 1))


def packing(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Runs of equal segment ids -> (seqlen [B, M], offsets [B, M + 1], run [B, T], start [B, T]) int32.

  Every row gets M sequences: its runs, then empty ones starting at T; the last offset column is -1 (jax drops
  it when it lays the offsets out for cuDNN). run / start: each token's run index and that run's first index.
  Runs beyond M are dropped (`layout_ok` rejects such rows).
  """
  b, t = segment_ids.shape
  first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1
  rows = jnp.arange(b)[:, None]
  seqlen = jnp.zeros((b, max_segments), jnp.int32).at[rows, run].add(1, mode="drop")
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  starts = jnp.full((b, max_segments), t, jnp.int32).at[rows, run].min(index, mode="drop")
  offsets = jnp.concatenate([starts, jnp.full((b, 1), -1, jnp.int32)], axis=1)
  start = jax.lax.cummax(jnp.where(first, index, 0), axis=1)
  return seqlen, offsets, run, start


def lse_from_stats(stats: jax.Array, run: jax.Array, start: jax.Array, max_segments: int) -> jax.Array:
  """cuDNN statistics [B * M, N, T] -> lse [B, T, N]: token t of row b is entry t - start of sequence b * M + run."""
  b, t = run.shape
  seq = jnp.arange(b, dtype=jnp.int32)[:, None] * max_segments + run
  return stats[seq, :, jnp.arange(t, dtype=jnp.int32)[None] - start]


def stats_from_lse(lse: jax.Array, run: jax.Array, start: jax.Array, max_segments: int) -> jax.Array:
  """The inverse of `lse_from_stats` (zeros where no token lands: the empty tails cuDNN never reads)."""
  b, t, n = lse.shape
  seq = jnp.arange(b, dtype=jnp.int32)[:, None] * max_segments + run
  stats = jnp.zeros((b * max_segments, n, t), jnp.float32)
  return stats.at[seq, :, jnp.arange(t, dtype=jnp.int32)[None] - start].set(lse)


def _heads(k: jax.Array) -> jax.Array:
  """Shared keys/values [B, S, H] become one key/value head [B, S, 1, H] (cuDNN's GQA)."""
  return k[:, :, None] if k.ndim == 3 else k


def _sequences(segment_ids: jax.Array, max_segments: int, dtype):
  """(q_seqlen, kv_seqlen, q_offsets, kv_offsets) operands and each token's (run, start); one segment per row
  needs no packing (empty operands, run and start None)."""
  if max_segments == 1:
    empty = jnp.zeros(0, dtype)
    return (empty,) * 4, None, None
  seqlen, offsets, run, start = packing(segment_ids, max_segments)
  return (seqlen, seqlen, offsets, offsets), run, start


def forward(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float,
            max_segments: int = DEFAULT_MAX_SEGMENTS) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Hk], k/v [B, S, (N,) H], segment_ids [B, T] (a `layout_ok` layout) -> (out, lse [B, T, N]).

  T < S (the queries are the last T keys of one document): two calls merged by their lse (the same split as
  FlashAttention's blocks), causal over the last T keys and over all S keys with the last T masked as padding
  (`kv_seqlen` = S - T), so that no [S - T] slice of the keys is copied.
  """
  t, s = q.shape[1], k.shape[1]
  if t == s:
    return _forward_call(q, k, v, segment_ids, scale, max_segments, _cudnn.MaskType.CAUSAL)
  out_tail, lse_tail = _forward_call(q, k[:, s - t:], v[:, s - t:], segment_ids, scale, 1, _cudnn.MaskType.CAUSAL)
  out_past, lse_past = _forward_call(q, k, v, segment_ids, scale, 1, _cudnn.MaskType.PADDING, kv_length=s - t)
  lse = jnp.logaddexp(lse_tail, lse_past)
  weight = lambda part_lse: jnp.exp(part_lse - lse)[..., None]
  out = out_tail.astype(jnp.float32) * weight(lse_tail) + out_past.astype(jnp.float32) * weight(lse_past)
  return out.astype(q.dtype), lse


def backward(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, out: jax.Array, lse: jax.Array,
             dout: jax.Array, *, scale: float, max_segments: int = DEFAULT_MAX_SEGMENTS):
  """(dq, dk, dv) of `forward` for the output cotangent `dout` (its lse cotangent taken as zero).

  T < S: each of the two calls' backward gets the merged output and lse, so its probabilities and
  D = rowsum(dO * O) are the whole row's: its dq is that key range's share and its dk / dv are exact. The
  padded call's dk / dv cover all S keys; the causal call's overwrite their last T rows in place.
  """
  t, s = q.shape[1], k.shape[1]
  if t == s:
    return _backward_call(q, k, v, segment_ids, out, lse, dout, scale, max_segments, _cudnn.MaskType.CAUSAL)
  dq_tail, dk_tail, dv_tail = _backward_call(q, k[:, s - t:], v[:, s - t:], segment_ids, out, lse, dout, scale, 1,
                                             _cudnn.MaskType.CAUSAL)
  dq_past, dk, dv = _backward_call(q, k, v, segment_ids, out, lse, dout, scale, 1, _cudnn.MaskType.PADDING,
                                   kv_length=s - t)
  dq = (dq_tail.astype(jnp.float32) + dq_past.astype(jnp.float32)).astype(dq_tail.dtype)
  return dq, dk.at[:, s - t:].set(dk_tail), dv.at[:, s - t:].set(dv_tail)


def _operands(q, segment_ids, max_segments, kv_length):
  """The (q_seqlen, kv_seqlen, q_offsets, kv_offsets) operands and each token's (run, start) (`_sequences`);
  with `kv_length`, one sequence a row whose keys after the first kv_length are padding."""
  if kv_length is None:
    return _sequences(segment_ids, max_segments, q.dtype)
  b, t = q.shape[:2]
  empty = jnp.zeros(0, q.dtype)
  return (jnp.full((b,), t, jnp.int32), jnp.full((b,), kv_length, jnp.int32), empty, empty), None, None


def _forward_call(q, k, v, segment_ids, scale, max_segments, mask_type, kv_length=None):
  """One cuDNN forward: `mask_type` CAUSAL (T == S, per packed run) or PADDING (keys from kv_length on masked)
  -> (out, lse [B, T, N])."""
  k, v = _heads(k), _heads(v)
  empty = jnp.zeros(0, q.dtype)
  _cudnn.check_layout(q, k, v, None, None, None, None, None, None, None, _cudnn.AttentionLayout.BTNH)
  _cudnn.check_is_flash_attention(q, k, v, _LAYOUT, _cudnn.check_cudnn_version(), False, True, max_segments > 1)
  operands, run, start = _operands(q, segment_ids, max_segments, kv_length)
  out, stats = _cudnn._dot_product_attention_fwd_p_wrapper.bind(
      q, k, v, empty, *operands, empty, empty, scale=scale, seed=0, dropout_rate=0.0, variadic_args=(False, False),
      mask_type=mask_type, layout=_LAYOUT, sliding_window_length=None, is_training=True)
  if run is None:
    return out, jnp.transpose(stats, (0, 2, 1))
  return out, lse_from_stats(stats, run, start, max_segments)


def _backward_call(q, k, v, segment_ids, out, lse, dout, scale, max_segments, mask_type, kv_length=None):
  """One cuDNN backward with the given output and lse -> (dq, dk, dv)."""
  shared = k.ndim == 3
  empty = jnp.zeros(0, q.dtype)
  operands, run, start = _operands(q, segment_ids, max_segments, kv_length)
  stats = jnp.transpose(lse, (0, 2, 1)) if run is None else stats_from_lse(lse, run, start, max_segments)
  dq, dk, dv = _cudnn._dot_product_attention_bwd_p_wrapper.bind(
      q, _heads(k), _heads(v), empty, *operands, empty, empty, stats, out, dout.astype(out.dtype), scale=scale,
      seed=0, dropout_rate=0.0, variadic_args=(False, False), mask_type=mask_type, layout=_LAYOUT,
      sliding_window_length=None)
  return (dq, dk[:, :, 0], dv[:, :, 0]) if shared else (dq, dk, dv)
