"""Paged decode cache of DeepSeek-V3.2: a page pool per layer shared by every sequence, block tables, FP8 entries.

Layout (FlashMLA's "FP8 with scale" V3.2 format, README and `tests/quant.py`): per token and layer the MLA entry
is the NoPE latent c (C = 512 values) as float8 e4m3 in tiles of 128 values with one float32 scale per tile,
then the RoPE part k_rope (R = 64) in bf16, unquantised: 512 + 4 x 4 + 64 x 2 = 656 bytes. FlashMLA packs the
three parts in one 656-byte row; here they are three arrays of the same pool (the same bytes, no padding), so
that XLA and the kernels read each part with its own dtype instead of bit-casting slices of a byte row:
  kv_nope  [P, BS, C]        float8_e4m3fn (C bytes)      | the cache dtype when it is bf16 / float32
  kv_scale [P, BS, C / 128]  float32 (4 x C / 128 bytes)  | None
  kv_rope  [P, BS, R]        bfloat16 (2 R bytes)         | the cache dtype
P pages of BS tokens (64 by default, FlashMLA's block size). Small configs with C < 128 use one tile of C values.
The indexer's key cache (official `Indexer.k_cache` / `k_scale_cache`) keeps H = 128 e4m3 values and one
float32 scale per token: idx_k [P, BS, H] and idx_scale [P, BS] (132 bytes), or idx_k in the cache dtype.

Quantisation (official `act_quant(x, 128, scale_fmt="ue8m0")`, FlashMLA `quantize_k_cache`): per tile
scale = 2^ceil(log2(max(amax, 1e-4) / 448)), e4m3 = round(x / scale); dequantised value = float(e4m3) x scale.
The power-of-two scale makes the dequantised value exact in bf16 and float32, and requantising dequantised
values returns them unchanged (`lightning_indexer.reference.quantize_e4m3`, the same function). FlashMLA's first
release stored amax / 448 itself; kernels only multiply by the stored scale, so they serve both. Each value is
then within 2^-4 of its magnitude (3 mantissa bits, round to nearest), or within 2^-10 x scale below e4m3's
smallest normal (2^-6 x scale).

Sequences map logical positions to pool rows through a block table [B, max_pages] int32 (-1: no page):
row = block_table[b, pos // BS] x BS + pos % BS of the pool flattened to [P x BS, ...], so sequences of any
lengths share one pool. `PageAllocator` hands out and takes back pages on the host between decode steps.

Decoding (`MLA` with a `PagedLayer`, through `attend`): a decode step writes its T new entries (quantised) at
their positions, then its queries read the pool through the decode kernels of issue 23, query t seeing logical
positions 0..t: `index_decode_topk` then `sparse_mla_decode` (DSA), or `dense_mla_decode`. Prefill runs the
ordinary forward over the prompt (its own entries, unquantised, as the full forward) and writes the entries
with `PagedKVCache.write` (`entries`): decode kernels are built for a few query rows per sequence.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.model.config import ModelConfig
from dsa_jax.model.indexer import IndexerInputs
from dsa_jax.validation import check_field, is_concrete
from pallas_kernels.index_decode import api as index_decode_api
from pallas_kernels.lightning_indexer.reference import quantize_e4m3
from pallas_kernels.mla_decode import api as mla_decode_api
from pallas_kernels.mla_decode import reference as mla_decode_reference

KV_DTYPES = ("float8_e4m3fn", "bfloat16", "float32")
TILE = 128  # latent values per float32 scale (FlashMLA's tile)
DEFAULT_PAGE_SIZE = 64


def latent_tile(c: int) -> int:
  """Values per scale of a latent of C values: 128, or C itself when C < 128."""
  if c % TILE == 0 or c < TILE:
    return min(c, TILE)
  raise ValueError(f"MLAConfig.kv_lora_rank={c} is invalid for the FP8 cache; allowed: a multiple of {TILE} or "
                   f"less than {TILE} (one tile).")


def bytes_per_token(cfg: ModelConfig, kv_dtype: str = "float8_e4m3fn") -> tuple[int, int]:
  """(MLA entry bytes, indexer key bytes) per token and layer: (656, 132) for V3.2 in FP8."""
  c, r = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
  h = 0 if cfg.indexer is None else cfg.indexer.head_dim
  if kv_dtype == "float8_e4m3fn":
    return c + 4 * (c // latent_tile(c)) + 2 * r, h + 4 * bool(h)
  size = jnp.dtype(kv_dtype).itemsize
  return size * (c + r), size * h


@dataclasses.dataclass(frozen=True)
class PagePool:
  """One layer's pages (module docstring); scales are None in a bf16 / float32 cache, idx_* None without indexer."""
  kv_nope: jax.Array  # [P, BS, C]
  kv_scale: jax.Array | None  # [P, BS, C / tile] float32
  kv_rope: jax.Array  # [P, BS, R]
  idx_k: jax.Array | None  # [P, BS, H]
  idx_scale: jax.Array | None  # [P, BS] float32

  def rows(self, name: str) -> jax.Array | None:
    """The named array flattened to pool rows [P x BS, ...] (what the decode kernels take)."""
    x = getattr(self, name)
    return None if x is None else x.reshape(-1, *x.shape[2:])


@dataclasses.dataclass(frozen=True)
class PagedLayer:
  """What one layer's attention gets: its pool and the block table of the batch."""
  pool: PagePool
  block_table: jax.Array  # [B, max_pages] int32

  @property
  def page_size(self) -> int:
    return self.pool.kv_nope.shape[1]

  def write(self, positions: jax.Array, c: jax.Array, k_rope: jax.Array, index_k: jax.Array | None) -> "PagedLayer":
    """Quantises and writes entries c [B, T, C], k_rope [B, T, R], index_k [B, T, H] at logical positions [B, T];
    writes through an unmapped page (-1) are dropped."""
    rows = mla_decode_reference.pool_rows(self.block_table, positions, self.page_size)
    return dataclasses.replace(self, pool=_write(self.pool, rows, c, k_rope, index_k))


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """The pools of all layers and the block table [B, max_pages] of the sequences in the batch slots."""
  layers: tuple[PagePool, ...]
  block_table: jax.Array

  @property
  def page_size(self) -> int:
    return self.layers[0].kv_nope.shape[1]

  @property
  def num_pages(self) -> int:
    return self.layers[0].kv_nope.shape[0]

  def layer(self, i: int) -> PagedLayer:
    return PagedLayer(self.layers[i], self.block_table)

  def with_layers(self, layers: tuple[PagedLayer, ...]) -> "PagedKVCache":
    return dataclasses.replace(self, layers=tuple(layer.pool for layer in layers))

  def with_block_table(self, block_table: jax.Array) -> "PagedKVCache":
    return dataclasses.replace(self, block_table=jnp.asarray(block_table, jnp.int32))

  def write(self, layer_entries, positions: jax.Array, block_table: jax.Array) -> "PagedKVCache":
    """Writes each layer's (entries [B, T, C + R], index keys [B, T, H] | None) (`entries`) at logical positions
    [B, T] of the sequences of `block_table` [B, max_pages] (a prefill's rows, not necessarily the batch's)."""
    rows = mla_decode_reference.pool_rows(block_table, positions, self.page_size)
    c_dim = self.layers[0].kv_nope.shape[-1]
    return dataclasses.replace(self, layers=tuple(
        _write(pool, rows, kv[..., :c_dim], kv[..., c_dim:], index_k)
        for pool, (kv, index_k) in zip(self.layers, layer_entries, strict=True)))


for _cls, _fields in ((PagePool, ["kv_nope", "kv_scale", "kv_rope", "idx_k", "idx_scale"]),
                      (PagedLayer, ["pool", "block_table"]), (PagedKVCache, ["layers", "block_table"])):
  jax.tree_util.register_dataclass(_cls, data_fields=_fields, meta_fields=[])


def init_paged_cache(cfg: ModelConfig, *, batch: int, num_pages: int, max_pages: int,
                     page_size: int = DEFAULT_PAGE_SIZE, kv_dtype: str = "float8_e4m3fn") -> PagedKVCache:
  """An empty pool of `num_pages` pages per layer and an unmapped block table [batch, max_pages] (the MTP layer
  is not cached). kv_dtype: "float8_e4m3fn" (the official layout), "bfloat16" or "float32" (no scales)."""
  check_field(kv_dtype in KV_DTYPES, "kv_dtype", kv_dtype, str(KV_DTYPES))
  for name, value in (("batch", batch), ("num_pages", num_pages), ("max_pages", max_pages), ("page_size", page_size)):
    check_field(isinstance(value, int) and value > 0, name, value, "a positive integer")
  fp8 = kv_dtype == "float8_e4m3fn"
  c, r = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
  shape = (num_pages, page_size)

  def pool() -> PagePool:
    h = None if cfg.indexer is None else cfg.indexer.head_dim
    return PagePool(
        kv_nope=jnp.zeros(shape + (c,), kv_dtype),
        kv_scale=jnp.zeros(shape + (c // latent_tile(c),), jnp.float32) if fp8 else None,
        kv_rope=jnp.zeros(shape + (r,), "bfloat16" if fp8 else kv_dtype),
        idx_k=None if h is None else jnp.zeros(shape + (h,), kv_dtype),
        idx_scale=jnp.zeros(shape, jnp.float32) if fp8 and h is not None else None)

  return PagedKVCache(tuple(pool() for _ in range(cfg.num_layers)), jnp.full((batch, max_pages), -1, jnp.int32))


def _write(pool: PagePool, rows: jax.Array, c, k_rope, index_k) -> PagePool:
  """Quantises (FP8 pools) and scatters entries [B, T, ...] to pool rows [B, T] (-1 dropped)."""
  flat_rows = rows.reshape(-1)

  def put(x: jax.Array | None, values: jax.Array) -> jax.Array | None:
    if x is None:
      return None
    flat = x.reshape(-1, *x.shape[2:])
    target = jnp.where(flat_rows >= 0, flat_rows, flat.shape[0])  # out of range: dropped (-1 would wrap)
    values = values.reshape(flat_rows.shape[0], *flat.shape[1:]).astype(flat.dtype)
    return flat.at[target].set(values, mode="drop").reshape(x.shape)

  nope, scale = (quantize_e4m3(c, latent_tile(c.shape[-1])) if pool.kv_scale is not None else (c, None))
  pool = dataclasses.replace(pool, kv_nope=put(pool.kv_nope, nope), kv_rope=put(pool.kv_rope, k_rope),
                             kv_scale=None if scale is None else put(pool.kv_scale, scale))
  if pool.idx_k is None:
    return pool
  if pool.idx_scale is None:
    return dataclasses.replace(pool, idx_k=put(pool.idx_k, index_k))
  keys, key_scale = quantize_e4m3(index_k, index_k.shape[-1])
  return dataclasses.replace(pool, idx_k=put(pool.idx_k, keys), idx_scale=put(pool.idx_scale, key_scale[..., 0]))


def entries(output) -> tuple[tuple[jax.Array, jax.Array | None], ...]:
  """Each layer's (MQA entries [B, T, C + R], indexer keys | None) of a forward pass run with MQA operands
  (sparse attention, or `apply(..., mqa_operands=True)`): what a prefill writes with `PagedKVCache.write`."""
  found = []
  for i, aux in enumerate(output.layer_aux):
    if aux.attention.mqa is None:
      raise ValueError(f"layer {i} returned no MQA entries; allowed: a forward with attention='sparse' or "
                       "mqa_operands=True.")
    found.append((aux.attention.mqa.kv, None if aux.attention.indexer is None else aux.attention.indexer.k))
  return tuple(found)


def attend(layer: PagedLayer, q: jax.Array, indexer: IndexerInputs | None, q_positions: jax.Array, *, kind: str,
           topk: int | None, scale: float,
           implementation: str | None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Absorbed queries q [B, T, N, C + R] at logical positions [B, T] over the pool, query t seeing positions
  0..t -> (out [B, T, N, C], lse [B, T, N], top-k logical positions [B, T, K] | None for dense).

  Rows go to the decode kernels as Q = B x T rows, each with its sequence's block table row.
  """
  b, t, n, _ = q.shape
  pool = layer.pool
  table = jnp.repeat(layer.block_table, t, axis=0)  # [Q, max_pages]
  lengths = (q_positions + 1).reshape(-1).astype(jnp.int32)
  kv = (pool.rows("kv_nope"), pool.rows("kv_scale"), pool.rows("kv_rope"))
  selected = None
  if kind == "sparse":
    iq = indexer.q.reshape(b * t, *indexer.q.shape[2:])
    selected, _ = index_decode_api.index_decode_topk(
        iq, None, indexer.w.reshape(b * t, -1), pool.rows("idx_k"), pool.rows("idx_scale"), table, lengths, k=topk,
        page_size=layer.page_size, implementation=implementation)
    rows = mla_decode_reference.pool_rows(table, selected, layer.page_size)
    out, lse = mla_decode_api.sparse_mla_decode(q.reshape(b * t, n, -1), *kv, rows, scale=scale,
                                                implementation=implementation)
    selected = selected.reshape(b, t, -1)
  else:
    out, lse = mla_decode_api.dense_mla_decode(q.reshape(b * t, n, -1), *kv, table, lengths, scale=scale,
                                               page_size=layer.page_size, implementation=implementation)
  return out.reshape(b, t, n, -1), lse.reshape(b, t, n), selected


def check_positions(cache: PagedKVCache, positions: jax.Array) -> None:
  """Raises ValueError where a token's position has no page to be written to (outside the table or on an
  unmapped entry) or where the block table itself is bad (`check_block_table`). Concrete values only."""
  if not (is_concrete(positions) and is_concrete(cache.block_table)):
    return
  table, pos = np.asarray(cache.block_table), np.asarray(positions)
  check_block_table(table, cache.num_pages)
  if pos.shape[0] != table.shape[0]:
    raise ValueError(f"positions has {pos.shape[0]} rows but the paged cache's block_table has {table.shape[0]}; "
                     "allowed: one block table row per sequence.")
  pages = pos // cache.page_size
  for b, t in zip(*np.nonzero(pages >= table.shape[1])):
    raise ValueError(f"positions[{b}, {t}]={pos[b, t]} needs page {pages[b, t]} of a block table of "
                     f"{table.shape[1]} pages; allowed: positions < {table.shape[1] * cache.page_size}.")
  for b, t in zip(*np.nonzero(np.take_along_axis(table, pages, axis=1) < 0)):
    if (table[b] >= 0).any():  # an empty row is a free batch slot: its writes are dropped, its outputs unused
      raise ValueError(f"positions[{b}, {t}]={pos[b, t]} falls on block_table[{b}, {pages[b, t]}]=-1 (no page); "
                       "allowed: positions on mapped pages (PageAllocator.allocate).")


def check_block_table(table: np.ndarray, num_pages: int) -> None:
  """Entries in -1..num_pages-1 and no page mapped twice (two sequences would overwrite each other)."""
  bad = np.argwhere((table < -1) | (table >= num_pages))
  if bad.size:
    b, j = bad[0]
    raise ValueError(f"block_table[{b}, {j}]={table[b, j]} is invalid; allowed: -1 (no page) or a page "
                     f"0 <= page < num_pages={num_pages}.")
  mapped = table[table >= 0]
  pages, counts = np.unique(mapped, return_counts=True)
  if (counts > 1).any():
    page = int(pages[counts > 1][0])
    where = ", ".join(f"[{b}, {j}]" for b, j in np.argwhere(table == page))
    raise ValueError(f"block_table maps page {page} at {where}; allowed: each page at most once.")


class PageAllocator:
  """Host-side pages of one pool: a free list and the block table [slots, max_pages] of the batch slots."""

  def __init__(self, num_pages: int, page_size: int, slots: int, max_pages: int):
    self.num_pages, self.page_size = num_pages, page_size
    self.block_table = np.full((slots, max_pages), -1, np.int32)
    self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page first

  @property
  def free_pages(self) -> int:
    return len(self._free)

  def pages_for(self, tokens: int) -> int:
    return math.ceil(tokens / self.page_size)

  def allocate(self, slot: int, tokens: int) -> None:
    """Maps pages to `slot` until it holds `tokens` positions; raises ValueError when the pool or the slot's
    row of the block table cannot hold them."""
    row = self.block_table[slot]
    have, need = int((row >= 0).sum()), self.pages_for(tokens)
    if need > row.size:
      raise ValueError(f"tokens={tokens} need {need} pages of {self.page_size}; allowed: at most max_pages="
                       f"{row.size} pages ({row.size * self.page_size} tokens) per sequence.")
    if need - have > len(self._free):
      raise ValueError(f"the paged cache pool is full: slot {slot} needs {need - have} more pages for "
                       f"tokens={tokens}, {len(self._free)} of num_pages={self.num_pages} are free; allowed: at "
                       f"most {have * self.page_size + len(self._free) * self.page_size} tokens for this slot now.")
    for j in range(have, need):
      row[j] = self._free.pop()

  def free(self, slot: int) -> None:
    """Returns the pages of `slot` to the pool and unmaps its row."""
    row = self.block_table[slot]
    self._free.extend(int(p) for p in row[::-1] if p >= 0)
    row[:] = -1
