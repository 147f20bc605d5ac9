"""Flash-style dense attention in XLA: tiles of queries x keys, an online softmax, visibility per tile.

Visibility comes from positions and segment ids per [block_q, block_k] tile (`pallas_kernels.visibility`), so no
[B, T, S] mask and no [.., T, S] logits exist in the forward or the backward: temporaries are a few
[B, N, block_q, block_k] float32 tiles and [B, block, N, H] accumulators (FlashAttention-2, Dao 2023, algorithms
1 and 2).

  forward   for each query block, the key blocks in its range: running max m, running sum l, accumulator
            acc += exp(s - m) @ v; then out = acc / l and lse = m + log(l) (out 0, lse -inf for a row that
            sees nothing).
  backward  recomputes P = exp(s - lse) per tile from the saved lse; D = rowsum(dO * O);
            dS = P * (dP - D + dlse) with dP = dO @ v^T (the lse cotangent adds P * dlse to d logits);
            dq = scale * dS @ k, dk = scale * dS^T @ q, dv = P^T @ dO. Two passes, one over query blocks (dq)
            and one over key blocks (dk, dv), so every accumulator is block-sized: a single pass would carry a
            float32 [B, T, N, Hk] dq (36 GiB for MQA mode at 128K). The price is recomputing s and dP once more
            (7 block matmuls instead of 5).

Skipping: a [num_q_blocks, num_k_blocks] map of blocks that may hold a visible pair (from each block's position
and segment-id ranges) bounds the inner loop of each block to its first..last possible partner. For keys in
document order (causal training, a decode cache whose unwritten slots sit at int32-max positions) that skips
the masked upper triangle and the other documents' blocks; tiles inside the range are masked exactly.

Blocks default to 512 x 512: one [B, N, 512, 512] float32 tile is 128 MiB at 128 heads. Not tuned on the GPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.visibility import visible

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
              q_segment_ids: jax.Array, kv_segment_ids: jax.Array, scale: float, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.attention`; block sizes need not divide T or S (inputs are padded)."""
  return _attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, float(scale), block_q,
                    block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, block_q, block_k):
  return forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale=scale, block_q=block_q,
                 block_k=block_k)


def _attention_fwd(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, block_q, block_k):
  out, lse = _attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, block_q,
                        block_k)
  return (out, lse), (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse)


def _attention_bwd(scale, block_q, block_k, res, cotangents):
  *inputs, out, lse = res
  grads = backward(*inputs, out, lse, *cotangents, scale=scale, block_q=block_q, block_k=block_k)
  return grads + (None,) * 4


_attention.defvjp(_attention_fwd, _attention_bwd)


def forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, scale: float,
            block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> tuple[jax.Array, jax.Array]:
  """(out [B, T, N, Hv], lse [B, T, N]) as `attention`, without its custom_vjp."""
  tiles = _Tiles.build(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_q, block_k)
  return _forward(tiles, scale)


def backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse, dout, dlse, *,
             scale: float, block_q: int = DEFAULT_BLOCK_Q,
             block_k: int = DEFAULT_BLOCK_K) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) in the dtypes of (q, k, v) for the cotangents (dout [B, T, N, Hv], dlse [B, T, N]) of `forward`'s
  (out, lse)."""
  tiles = _Tiles.build(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_q, block_k)
  return _backward(tiles, out, lse, dout, dlse, scale)


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Inputs padded to whole blocks, plus the block-pair map that bounds every inner loop."""
  t: int  # unpadded lengths
  s: int
  block_q: int
  block_k: int
  shared: bool  # MQA mode: k [B, S, Hk], v [B, S, Hv]
  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array
  kv_valid: jax.Array  # [S_pad]: False on padding
  pairs: jax.Array | None = None  # bool [num_q_blocks, num_k_blocks], see `block_pairs`

  @classmethod
  def build(cls, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_q, block_k):
    t, s = q.shape[1], k.shape[1]
    block_q, block_k = min(block_q, t), min(block_k, s)
    pad_t, pad_s = -t % block_q, -s % block_k
    rows = lambda x, p: jnp.pad(x, [(0, 0), (0, p)] + [(0, 0)] * (x.ndim - 2))
    # Edge padding keeps every block's position and segment ranges; padded keys are masked by `kv_valid`.
    edge = lambda x, p: jnp.pad(x, [(0, 0), (0, p)], mode="edge")
    tiles = cls(t, s, block_q, block_k, k.ndim == 3, rows(q, pad_t), rows(k, pad_s), rows(v, pad_s),
                edge(q_positions, pad_t), edge(kv_positions, pad_s), edge(q_segment_ids, pad_t),
                edge(kv_segment_ids, pad_s), jnp.arange(s + pad_s) < s)
    return dataclasses.replace(tiles, pairs=tiles.block_pairs())

  @property
  def num_q_blocks(self) -> int:
    return self.q.shape[1] // self.block_q

  @property
  def num_k_blocks(self) -> int:
    return self.k.shape[1] // self.block_k

  def block_pairs(self) -> jax.Array:
    """bool [num_q_blocks, num_k_blocks]: whether the pair of blocks may hold a visible (query, key) pair in any
    row of the batch (conservative: position and segment-id ranges)."""
    b = self.q.shape[0]
    qr = lambda x, f: f(x.reshape(b, self.num_q_blocks, self.block_q), axis=-1)[:, :, None]
    kr = lambda x, f: f(x.reshape(b, self.num_k_blocks, self.block_k), axis=-1)[:, None, :]
    causal = kr(self.kv_positions, jnp.min) <= qr(self.q_positions, jnp.max)
    overlap = ((kr(self.kv_segment_ids, jnp.min) <= qr(self.q_segment_ids, jnp.max))
               & (qr(self.q_segment_ids, jnp.min) <= kr(self.kv_segment_ids, jnp.max)))
    return jnp.any(causal & overlap, axis=0)

  def q_block(self, i, x):
    return jax.lax.dynamic_slice_in_dim(x, i * self.block_q, self.block_q, axis=1)

  def k_block(self, j, x):
    return jax.lax.dynamic_slice_in_dim(x, j * self.block_k, self.block_k, axis=1)

  def mask(self, i, j) -> jax.Array:
    """bool [B, 1, block_q, block_k]: visibility of the tile (query block i, key block j)."""
    seen = visible(self.q_block(i, self.q_positions), self.k_block(j, self.kv_positions),
                   self.q_block(i, self.q_segment_ids), self.k_block(j, self.kv_segment_ids))
    return (seen & self.k_block(j, self.kv_valid[None]))[:, None]

  def logits(self, q_blk, k_blk, scale) -> jax.Array:
    """[B, N, block_q, block_k] float32."""
    eq = "btnh,bsh->bnts" if self.shared else "btnh,bsnh->bnts"
    return jnp.einsum(eq, q_blk, k_blk, preferred_element_type=jnp.float32) * scale

  def p_at(self, p, x) -> jax.Array:
    """P [B, N, bq, bk] @ x [B, bk, (N,) H] -> [B, bq, N, H] float32."""
    eq = "bnts,bsh->btnh" if self.shared else "bnts,bsnh->btnh"
    return jnp.einsum(eq, p.astype(x.dtype), x, preferred_element_type=jnp.float32)

  def pt_at(self, p, x) -> jax.Array:
    """P^T [B, N, bk, bq] @ x [B, bq, N, H] -> [B, bk, (N,) H] float32 (summed over heads when shared)."""
    eq = "bnts,btnh->bsh" if self.shared else "bnts,btnh->bsnh"
    return jnp.einsum(eq, p.astype(x.dtype), x, preferred_element_type=jnp.float32)


def _range(row: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last True index of a bool row; (0, 0) when none."""
  n = row.shape[0]
  first = jnp.argmax(row)
  last = n - jnp.argmax(row[::-1])
  return jnp.where(row.any(), first, 0), jnp.where(row.any(), last, 0)


def _forward(tiles: _Tiles, scale: float) -> tuple[jax.Array, jax.Array]:
  b, _, n, _ = tiles.q.shape
  hv = tiles.v.shape[-1]

  def query_block(_, i):
    q_blk = tiles.q_block(i, tiles.q)

    def key_block(j, carry):
      m, l, acc = carry
      s = jnp.where(tiles.mask(i, j), tiles.logits(q_blk, tiles.k_block(j, tiles.k), scale), -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      acc = acc * jnp.transpose(alpha, (0, 2, 1))[..., None] + tiles.p_at(p, tiles.k_block(j, tiles.v))
      return m_new, alpha * l + p.sum(axis=-1), acc

    init = (jnp.full((b, n, tiles.block_q), -jnp.inf), jnp.zeros((b, n, tiles.block_q)),
            jnp.zeros((b, tiles.block_q, n, hv)))
    lo, hi = _range(tiles.pairs[i])
    m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
    seen = l > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    out = acc / jnp.transpose(jnp.where(seen, l, 1.0), (0, 2, 1))[..., None]
    return None, (out.astype(tiles.q.dtype), jnp.transpose(lse, (0, 2, 1)))

  _, (out, lse) = jax.lax.scan(query_block, None, jnp.arange(tiles.num_q_blocks))
  out = jnp.moveaxis(out, 0, 1).reshape(b, -1, n, hv)[:, :tiles.t]
  return out, jnp.moveaxis(lse, 0, 1).reshape(b, -1, n)[:, :tiles.t]


def _probabilities(tiles: _Tiles, i, j, q_blk, k_blk, lse_blk, scale) -> jax.Array:
  """P [B, N, bq, bk] of tile (i, j) from the saved lse [B, bq, N]; 0 where masked or the row sees nothing."""
  lse_bnt = jnp.transpose(lse_blk, (0, 2, 1))
  p = jnp.exp(tiles.logits(q_blk, k_blk, scale) - jnp.where(jnp.isfinite(lse_bnt), lse_bnt, 0.0)[..., None])
  return jnp.where(tiles.mask(i, j), p, 0.0)


def _ds(tiles: _Tiles, p, do_blk, v_blk, delta_blk) -> jax.Array:
  """dS = P * (dP - D + dlse) [B, N, bq, bk] float32, with delta_blk = D - dlse [B, bq, N]."""
  eq = "btnh,bsh->bnts" if tiles.shared else "btnh,bsnh->bnts"
  dp = jnp.einsum(eq, do_blk, v_blk, preferred_element_type=jnp.float32)
  return p * (dp - jnp.transpose(delta_blk, (0, 2, 1))[..., None])


def _backward(tiles: _Tiles, out, lse, dout, dlse, scale) -> tuple[jax.Array, jax.Array, jax.Array]:
  b, _, n, hk = tiles.q.shape
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tiles.q.shape[1] - tiles.t)] + [(0, 0)] * (x.ndim - 2))
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - dlse  # [B, T, N]
  do, lse, delta = pad(dout), pad(lse), pad(delta)

  def dq_block(_, i):
    q_blk, do_blk = tiles.q_block(i, tiles.q), tiles.q_block(i, do)
    lse_blk, delta_blk = tiles.q_block(i, lse), tiles.q_block(i, delta)

    def key_block(j, dq):
      k_blk = tiles.k_block(j, tiles.k)
      p = _probabilities(tiles, i, j, q_blk, k_blk, lse_blk, scale)
      ds = _ds(tiles, p, do_blk, tiles.k_block(j, tiles.v), delta_blk)
      return dq + scale * tiles.p_at(ds, k_blk)

    lo, hi = _range(tiles.pairs[i])
    dq = jax.lax.fori_loop(lo, hi, key_block, jnp.zeros((b, tiles.block_q, n, hk)))
    return None, dq.astype(tiles.q.dtype)

  def dkv_block(_, j):
    k_blk, v_blk = tiles.k_block(j, tiles.k), tiles.k_block(j, tiles.v)

    def query_block(i, carry):
      dk, dv = carry
      q_blk, do_blk = tiles.q_block(i, tiles.q), tiles.q_block(i, do)
      p = _probabilities(tiles, i, j, q_blk, k_blk, tiles.q_block(i, lse), scale)
      ds = _ds(tiles, p, do_blk, v_blk, tiles.q_block(i, delta))
      return dk + scale * tiles.pt_at(ds, q_blk), dv + tiles.pt_at(p, do_blk)

    lo, hi = _range(tiles.pairs[:, j])
    init = (jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo, hi, query_block, init)
    return None, (dk.astype(tiles.k.dtype), dv.astype(tiles.v.dtype))

  _, dq = jax.lax.scan(dq_block, None, jnp.arange(tiles.num_q_blocks))
  _, (dk, dv) = jax.lax.scan(dkv_block, None, jnp.arange(tiles.num_k_blocks))
  merge = lambda x, length: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[3:])[:, :length]
  return merge(dq, tiles.t), merge(dk, tiles.s), merge(dv, tiles.s)
