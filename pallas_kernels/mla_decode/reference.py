"""Reference MLA decode over a paged latent cache (float32 spec): sparse (selected rows) and dense (every visible row).

Absorbed-MQA decoding (DeepSeek-V3.2, arXiv 2512.02556, section 2.1; FlashMLA's decode kernels are the official
counterpart): each query row attends, with all N heads, to cache entries [c (C) | k_rope (R)]; the value of an entry
is its latent c. The cache is a pool of rows (the paged cache of `dsa_jax/model/paged_cache.py`): kv_nope
[rows, C] in float8_e4m3fn with one float32 scale per 128-value tile (kv_scale [rows, C/128]; a single tile when
C < 128) or in bf16 with kv_scale None, and kv_rope [rows, R] in bf16. Dequantised c = float(fp8) * its tile's
scale. The three arrays hold the bytes of FlashMLA's 656-byte entry (512 + 16 + 128 in V3.2).

Logical position p of sequence row q lives at pool row block_table[q, p // BS] * BS + p % BS.
"""

import jax
import jax.numpy as jnp


def dequantize(kv_nope: jax.Array, kv_scale: jax.Array | None) -> jax.Array:
  """[..., C] fp8 (or bf16) and [..., C / tile] float32 scales (or None) -> [..., C] float32."""
  c = kv_nope.astype(jnp.float32)
  if kv_scale is None:
    return c
  tiles = kv_scale.shape[-1]
  if c.shape[-1] % tiles:
    raise ValueError(f"mla_decode.reference: kv_scale has {tiles} tiles per row, which does not divide C = "
                     f"{c.shape[-1]}; allowed: C / 128 tiles (1 when C < 128).")
  c = c.reshape(*c.shape[:-1], tiles, -1) * kv_scale[..., None].astype(jnp.float32)
  return c.reshape(kv_nope.shape)


def sparse_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                      indices: jax.Array, *, scale: float) -> tuple[jax.Array, jax.Array]:
  """q [Q, N, C + R], kv_nope [rows, C], kv_scale [rows, C / 128] | None, kv_rope [rows, R], indices [Q, K] pool
  rows (-1 = skip) -> (out [Q, N, C] float32, lse [Q, N] float32).

  Softmax in float32 over scale * q . [c | k_rope] of the valid selected rows; lse in natural log; a row with no
  valid index gives out 0 and lse -inf. Gathers the [Q, K] selected rows before dequantising them.
  """
  valid = indices >= 0
  rows = jnp.where(valid, indices, 0)
  c = dequantize(kv_nope[rows], None if kv_scale is None else kv_scale[rows])  # [Q, K, C]
  keys = jnp.concatenate([c, kv_rope[rows].astype(jnp.float32)], axis=-1)
  logits = jnp.einsum("qnd,qkd->qnk", q.astype(jnp.float32), keys) * scale
  logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  return jnp.einsum("qnk,qkc->qnc", probs, c), lse


def pool_rows(block_table: jax.Array, positions: jax.Array, page_size: int) -> jax.Array:
  """Logical positions [Q, P] (-1: none) through block_table [Q, max_pages] -> pool rows [Q, P] int32; -1 where the
  position is -1, lies beyond the table or sits on an unmapped page (-1 in the table)."""
  page_index = positions // page_size
  inside = (positions >= 0) & (page_index < block_table.shape[1])
  pages = jnp.take_along_axis(block_table, jnp.where(inside, page_index, 0), axis=1)
  return jnp.where(inside & (pages >= 0), pages * page_size + positions % page_size, -1).astype(jnp.int32)


def dense_rows(block_table: jax.Array, lengths: jax.Array, *, page_size: int) -> jax.Array:
  """block_table [Q, max_pages], lengths [Q] -> pool rows [Q, max_pages * page_size] of the logical positions in
  order, -1 at positions >= lengths[q]."""
  positions = jnp.arange(block_table.shape[-1] * page_size, dtype=jnp.int32)[None, :]
  visible = jnp.where(positions < lengths[:, None], positions, -1)
  return pool_rows(block_table, visible, page_size)


def dense_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                     block_table: jax.Array, lengths: jax.Array, *, scale: float,
                     page_size: int) -> tuple[jax.Array, jax.Array]:
  """`sparse_mla_decode` over every visible row: the logical positions 0 .. lengths[q] - 1 through the block table."""
  rows = dense_rows(block_table, lengths, page_size=page_size)
  return sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, rows, scale=scale)
