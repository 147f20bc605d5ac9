"""Benchmark section "mla_decode" (run on the GPU by `experiments/bench_kernels.py`; table: benchmarks/decode.md).

Per context position T (`seq_lens`) and batch B in BATCHES, one decode step of one layer at V3.2 shapes: 128 heads
of 576-dim absorbed queries (latent 512 + rope 64), every sequence T positions long in its own pages (64 rows, in
shuffled order in the pool). Sparse: K = min(2048, T) selected positions per row, uniform, mapped to pool rows.
Dense: every position through the block table. Each kernel row beside the XLA reference path (`implementation=
"xla"`) timed in the same run, on the bf16 cache and on the FP8 cache (the kernel's FP8 variant).

bytes moved = Q * keys * entry bytes (bf16 cache 1152 = 576 x 2; FP8 656 = 512 + 16 + 128) + q (Q * N * 576 x 2)
+ out (Q * N * 512 x 2): every selected row counted once per query row (the second 64-head tile re-reads it from
L2), indices and the split-K partials not counted. GB/s = bytes / time; % of peak against `baselines.PEAK_HBM`, the
vendor's figure for the device kind (None when unknown). out_rel_err: max |out - ref| / max |ref| on the first
ERR_ROWS rows against the float32 reference.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer.reference import quantize_e4m3
from pallas_kernels.mla_decode import api, reference

HEADS, LATENT, ROPE, TOPK, PAGE = 128, 512, 64, 2048, 64
SCALE = 0.1352338
BATCHES = (1, 32, 128)
ERR_ROWS = 4
ENTRY_BYTES = {False: (LATENT + ROPE) * 2, True: LATENT + 4 * LATENT // 128 + ROPE * 2}


def bytes_moved(rows: int, keys: int, heads: int, fp8: bool) -> int:
  """Cache rows read + q + out of one decode step (module docstring)."""
  return rows * keys * ENTRY_BYTES[fp8] + rows * heads * ((LATENT + ROPE) + LATENT) * 2


def inputs(T: int, batch: int, seed: int = 0):  # noqa: N803
  """q [B, N, 576], bf16 cache (kv_nope, kv_rope) of B * T rows, its FP8 form (c8, scale), block table [B, T / 64],
  lengths [B] = T and sparse pool rows [B, min(K, T)]."""
  ks = jax.random.split(jax.random.key(seed), 5)
  pages = batch * (-(-T // PAGE))
  q = jax.random.normal(ks[0], (batch, HEADS, LATENT + ROPE), jnp.bfloat16)
  kv_nope = jax.random.normal(ks[1], (pages * PAGE, LATENT), jnp.bfloat16)
  kv_rope = jax.random.normal(ks[2], (pages * PAGE, ROPE), jnp.bfloat16)
  table = jax.random.permutation(ks[3], pages).reshape(batch, -1).astype(jnp.int32)
  lengths = jnp.full((batch,), T, jnp.int32)
  positions = jax.random.randint(ks[4], (batch, min(TOPK, T)), 0, T)
  rows = table[jnp.arange(batch)[:, None], positions // PAGE] * PAGE + positions % PAGE
  return q, (kv_nope, kv_rope), _quantize(kv_nope), table, lengths, rows.astype(jnp.int32)


@jax.jit
def _quantize(kv_nope):
  """The FP8 cache of the pool, a page at a time (the float32 temporaries of the whole pool would not fit)."""
  c8, s = jax.lax.map(lambda page: quantize_e4m3(page, 128), kv_nope.reshape(-1, PAGE, LATENT))
  return c8.reshape(kv_nope.shape), s.reshape(kv_nope.shape[0], -1)


@functools.cache
def _fns():
  sparse = lambda impl: jax.jit(functools.partial(api.sparse_mla_decode, scale=SCALE, implementation=impl))
  dense = lambda impl: jax.jit(functools.partial(api.dense_mla_decode, scale=SCALE, page_size=PAGE,
                                                 implementation=impl))
  return {("sparse", impl): sparse(impl) for impl in ("pallas", "xla")} | {
      ("dense", impl): dense(impl) for impl in ("pallas", "xla")}


def _rel_err(out, want) -> float:
  return float(jnp.max(jnp.abs(out[:ERR_ROWS].astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))


def _rows_for(rows: list[dict], base: dict, q, cache, table, lengths, sparse_rows) -> None:
  peak = baselines.peak_hbm()
  (kv_nope, kv_rope), (c8, s) = cache
  for mode, impl, fp8 in ((mode, impl, fp8) for mode in ("sparse", "dense") for fp8 in (False, True)
                          for impl in ("pallas", "xla")):
    nope, scale_ = (c8, s) if fp8 else (kv_nope, None)
    where = (sparse_rows,) if mode == "sparse" else (table, lengths)
    args = (q, nope, scale_, kv_rope, *where)
    fn = _fns()[(mode, impl)]
    what = f"{mode} {impl} T={base['T']} B={base['batch']}"
    if impl == "xla" and not timing.fits_memory(what, fn, *args):
      continue
    print(f"mla_decode: {what} fp8={fp8} ...", flush=True)
    seconds = timing.time_fn(fn, *args)
    out = fn(*args)[0]
    head = (q[:ERR_ROWS], nope, scale_, kv_rope, *(x[:ERR_ROWS] for x in where))
    ref = (reference.sparse_mla_decode(*head, scale=SCALE) if mode == "sparse" else
           reference.dense_mla_decode(*head, scale=SCALE, page_size=PAGE))[0]
    keys = sparse_rows.shape[-1] if mode == "sparse" else base["T"]
    moved = bytes_moved(q.shape[0], keys, HEADS, fp8)
    row = dict(base, op=mode, impl=impl, cache="fp8" if fp8 else "bf16", keys=keys, us=seconds * 1e6,
               bytes=moved, gbps=moved / seconds / 1e9, pct_peak=None if peak is None else 100 * moved / seconds / peak,
               out_rel_err=_rel_err(out, ref))
    rows.append(row)
    print(row, flush=True)


def run(cfg: dict) -> list[dict]:
  """Section "mla_decode": sparse and dense decode, kernel against the XLA path, per T in seq_lens and batch."""
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    for batch in BATCHES:
      q, bf16, fp8, table, lengths, sparse_rows = inputs(T, batch)
      _rows_for(rows, dict(section="mla_decode", T=T, batch=batch, heads=HEADS), q, (bf16, fp8), table, lengths,
                sparse_rows)
  return rows


SECTIONS = {"mla_decode": run}
