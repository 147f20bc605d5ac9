"""The paged decode cache: layout and FP8 quantisation, paged decoding against the full forward, page allocation
and the errors of a full pool or a bad block table (`dsa_jax.model.paged_cache`)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional, paged_cache
from dsa_jax.model.config import IndexerConfig, MLAConfig, tiny, v3_2_671b
from dsa_jax.model.paged_cache import PageAllocator, init_paged_cache
from pallas_kernels.lightning_indexer.reference import quantize_e4m3

CFG = tiny()  # index top-k 8, so the sequences run well beyond it
# C = 512 / R = 64 as in V3.2 (four FP8 tiles per entry, indexer keys of 128 values), everything else tiny.
WIDE = tiny().replace(num_layers=2, num_mtp_layers=0, indexer=IndexerConfig(num_heads=4, head_dim=128, topk=8),
                      mla=MLAConfig(num_heads=2, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=16,
                                    qk_rope_head_dim=64, v_head_dim=16))
SEQS = [list(np.random.default_rng(0).integers(1, CFG.vocab_size, 22)),
        list(np.random.default_rng(1).integers(1, CFG.vocab_size, 17))]
PROMPT_LENS = (5, 9)
PAGE = 4  # small pages: every sequence spans several, interleaved with the other's


@functools.lru_cache(maxsize=None)
def _params(cfg):
  return jax.jit(functools.partial(functional.init, cfg, seed=3))()


@functools.lru_cache(maxsize=None)
def _jitted(cfg, attention, indexer_fp8):
  run = functools.partial(functional.apply, cfg, _params(cfg), attention=attention, indexer_fp8=indexer_fp8)
  prefill = jax.jit(lambda ids: run(ids, mqa_operands=True))
  step = jax.jit(lambda ids, positions, cache: run(ids, positions=positions, cache=cache))
  return prefill, step, jax.jit(run)


def _interleaved_allocator(seqs, slots):
  """Pages handed out one position at a time, round robin: the sequences' pages alternate in the pool."""
  alloc = PageAllocator(num_pages=12, page_size=PAGE, slots=slots, max_pages=6)
  for pos in range(max(map(len, seqs))):
    for b, seq in enumerate(seqs):
      if pos < len(seq):
        alloc.allocate(b, pos + 1)
  return alloc


def _paged_decode(cfg, seqs, prompt_lens, attention, kv_dtype, indexer_fp8=False):
  """Prefill each prompt, then decode the rest one token per step, all sequences in one batch (a finished one
  leaves its slot unmapped) -> per sequence (logits [len, V], per step each layer's top-k logical positions)."""
  prefill, step, _ = _jitted(cfg, attention, indexer_fp8)
  alloc = _interleaved_allocator(seqs, len(seqs))
  cache = init_paged_cache(cfg, batch=len(seqs), num_pages=12, max_pages=6, page_size=PAGE, kv_dtype=kv_dtype)
  logits, selected = [], [[] for _ in seqs]
  for b, (seq, p) in enumerate(zip(seqs, prompt_lens)):
    out = prefill(jnp.asarray([seq[:p]]))
    cache = cache.write(paged_cache.entries(out), jnp.arange(p)[None], alloc.block_table[b:b + 1])
    logits.append([np.asarray(out.logits[0])])
  for j in range(max(len(s) - p for s, p in zip(seqs, prompt_lens))):
    live = [p + j < len(s) for s, p in zip(seqs, prompt_lens)]
    ids = [s[p + j] if ok else 0 for s, p, ok in zip(seqs, prompt_lens, live)]
    positions = [p + j if ok else 0 for p, ok in zip(prompt_lens, live)]
    out = step(jnp.asarray(ids)[:, None], jnp.asarray(positions)[:, None],
               cache.with_block_table(np.where(np.asarray(live)[:, None], alloc.block_table, -1)))
    cache = out.cache.with_block_table(alloc.block_table)
    for b in np.flatnonzero(live):
      logits[b].append(np.asarray(out.logits[b]))
      if attention == "sparse":
        selected[b].append([np.asarray(aux.attention.topk_indices[b, 0]) for aux in out.layer_aux])
  return [np.concatenate(x) for x in logits], selected


def test_layout_is_flashmla_656_bytes_and_quantisation_error_is_bounded():
  """V3.2's entry: 512 e4m3 + 4 float32 scales + 64 bf16 = 656 bytes (indexer: 128 + 4); each dequantised
  value lies within 2^-4 of its magnitude (3 mantissa bits) or 2^-10 x scale (e4m3 subnormals)."""
  cfg = v3_2_671b()
  assert paged_cache.bytes_per_token(cfg) == (656, 132)
  assert paged_cache.bytes_per_token(cfg, "bfloat16") == (1152, 256)
  pool = jax.eval_shape(lambda: init_paged_cache(cfg, batch=2, num_pages=3, max_pages=2)).layers[0]
  assert (pool.kv_nope.shape, pool.kv_nope.dtype) == ((3, 64, 512), jnp.float8_e4m3fn)
  assert (pool.kv_scale.shape, pool.kv_scale.dtype, pool.kv_rope.dtype) == ((3, 64, 4), jnp.float32, jnp.bfloat16)
  assert (pool.idx_k.shape, pool.idx_scale.shape) == ((3, 64, 128), (3, 64))
  row = sum(x.dtype.itemsize * x.shape[-1] for x in (pool.kv_nope, pool.kv_scale, pool.kv_rope))
  assert row == 656
  x = jax.random.normal(jax.random.key(0), (64, 512)) * jnp.logspace(-6, 3, 64)[:, None]
  values, scale = quantize_e4m3(x, paged_cache.latent_tile(512))
  dequant = np.asarray(values.astype(jnp.float32).reshape(64, 4, 128) * scale[..., None]).reshape(64, 512)
  bound = np.maximum(2.0**-4 * np.abs(np.asarray(x)), 2.0**-10 * np.repeat(np.asarray(scale), 128, axis=-1))
  assert (np.abs(dequant - np.asarray(x)) <= bound).all()
  np.testing.assert_array_equal(np.log2(np.asarray(scale)) % 1, 0)  # ue8m0: powers of two
  assert paged_cache.latent_tile(16) == 16
  with pytest.raises(ValueError, match=r"kv_lora_rank=200 is invalid for the FP8 cache; allowed: a multiple of 128"):
    paged_cache.latent_tile(200)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_paged_decode_equals_full_forward(attention):
  """Float32 pool (the tiny model's dtype): the same tolerance as the unpaged decode test."""
  logits, _ = _paged_decode(CFG, SEQS, PROMPT_LENS, attention, "float32")
  full = _jitted(CFG, attention, False)[2]
  for b, seq in enumerate(SEQS):
    chex.assert_trees_all_close(logits[b], np.asarray(full(jnp.asarray([seq])).logits[0]), atol=2e-5, rtol=2e-5)
  if attention == "sparse":  # interleaved in one pool and batch == each sequence decoded alone
    for b, (seq, p) in enumerate(zip(SEQS, PROMPT_LENS)):
      alone, _ = _paged_decode(CFG, [seq], [p], attention, "float32")
      chex.assert_trees_all_close(logits[b], alone[0], atol=1e-6, rtol=1e-6)


def test_fp8_cache_decode_within_e4m3_tolerance():
  """FP8 pool (C = 512, four tiles; indexer keys of 128 values) against the forward without cache.

  Tolerance: every cached value is off by at most 2^-4 of its size, and attention reads it twice (the keys set
  the softmax weights, the values are averaged under them), so to first order an attention output moves by up
  to 2 x 2^-4 of its size; the residual stream only dilutes that, so the logits stay within relative L2 error
  2^-3. Measured: 0.058 and 0.011 for the two sequences. A no-op quantisation would give ~1e-7 (float32
  pool), so the test also asserts more than 1e-3.
  Selected sets: with the official FP8 indexer numerics (`indexer_fp8`) the keys are e4m3 values already and
  storing them is exact, so layer 0 (whose inputs no FP8 latent touched) selects exactly as the forward; later
  layers see hidden states moved by the FP8 latents. Measured overlap there: 0.977 and 1.0; the floor 0.9 allows
  one swapped key in ten.
  """
  logits, selected = _paged_decode(WIDE, SEQS, PROMPT_LENS, "sparse", "float8_e4m3fn", indexer_fp8=True)
  full = _jitted(WIDE, "sparse", True)[2]
  for b, (seq, p) in enumerate(zip(SEQS, PROMPT_LENS)):
    out = full(jnp.asarray([seq]))
    reference = np.asarray(out.logits[0])
    rel = np.linalg.norm(logits[b] - reference) / np.linalg.norm(reference)
    assert 1e-3 < rel <= 2.0**-3, rel
    for layer in range(WIDE.num_layers):
      ref_sets = np.asarray(out.layer_aux[layer].attention.topk_indices[0])
      pairs = [(set(ref_sets[p + j]) - {-1}, set(step[layer]) - {-1}) for j, step in enumerate(selected[b])]
      overlap = sum(len(a & c) for a, c in pairs) / sum(len(a) for a, _ in pairs)
      assert overlap == 1.0 if layer == 0 else overlap >= 0.9, (layer, overlap)


def test_allocator_reuses_freed_pages_and_full_pool_errors():
  alloc = PageAllocator(num_pages=4, page_size=4, slots=2, max_pages=3)
  alloc.allocate(0, 9)  # 3 pages
  np.testing.assert_array_equal(alloc.block_table, [[0, 1, 2], [-1, -1, -1]])
  with pytest.raises(ValueError, match=r"the paged cache pool is full: slot 1 needs 2 more pages for tokens=5, 1 of "
                                       r"num_pages=4 are free; allowed: at most 4 tokens for this slot now"):
    alloc.allocate(1, 5)
  with pytest.raises(ValueError, match=r"tokens=13 need 4 pages of 4; allowed: at most max_pages=3 pages"):
    alloc.allocate(1, 13)
  alloc.free(0)
  alloc.allocate(1, 5)
  assert alloc.free_pages == 2 and (alloc.block_table[0] == -1).all() and (alloc.block_table[1][:2] >= 0).all()


@pytest.mark.parametrize("table, positions, message", [
    ([[0, 7], [1, -1]], [[0], [0]], r"block_table\[0, 1\]=7 is invalid; allowed: -1 \(no page\) or a page 0 <= page "
                                    r"< num_pages=4"),
    ([[0, 2], [2, -1]], [[0], [0]], r"block_table maps page 2 at \[0, 1\], \[1, 0\]; allowed: each page at most once"),
    ([[0, 2], [1, -1]], [[0], [5]], r"positions\[1, 0\]=5 falls on block_table\[1, 1\]=-1 \(no page\)"),
    ([[0, 2], [1, -1]], [[8], [0]], r"positions\[0, 0\]=8 needs page 2 of a block table of 2 pages; allowed: "
                                    r"positions < 8"),
])
def test_bad_block_tables_fail_before_decoding(table, positions, message):
  cache = init_paged_cache(CFG, batch=2, num_pages=4, max_pages=2, page_size=PAGE, kv_dtype="float32")
  with pytest.raises(ValueError, match=message):
    functional.apply(CFG, _params(CFG), jnp.ones((2, 1), jnp.int32), positions=jnp.asarray(positions),
                     cache=cache.with_block_table(jnp.asarray(table)))
  with pytest.raises(ValueError, match=r"a PagedKVCache needs positions"):
    functional.apply(CFG, _params(CFG), jnp.ones((2, 1), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match=r"kv_dtype='int8' is invalid; allowed: \('float8_e4m3fn', 'bfloat16'"):
    init_paged_cache(CFG, batch=1, num_pages=1, max_pages=1, kv_dtype="int8")
