"""Benchmark section "index_decode": the indexer of one decode step, scores over a paged key cache + top-2048, at
V3.2 shapes (GPU; benchmarks/decode.md).

  python -m experiments.bench_kernels --sections=index_decode --seq_lens=4096,16384,32768,65536,131072

Per context length S and batch Q in BATCHES (one decode row per sequence, every row seeing all S keys, 64 index
heads x 128, FP8 keys with a float32 scale per token in pages of 64 shuffled over the pool, e4m3 q with a scale
per head):
- `index_decode_topk` end to end, "pallas" (the split-K scores kernel, then the pruned select on the [Q, S]
  scores) and "xla" (the reference: gathered keys, einsum, `lax.top_k`), and the share of rows whose selections
  agree (random inputs: near-equal scores summed in another order may swap at the k-th place);
- the "pallas" path's two halves alone: the scores (kernel + position mask) and the selection;
- the scores of bf16 keys and q (the bf16 cache).
Bytes moved per step = what the scores must read: Q S (H + 4) for FP8 keys and their scales (Q S 2H for bf16),
plus the queries, their scales and head weights, Q I (H + 8) (Q I (2H + 4) in bf16); the block table and the
[Q, S] float32 scores buffer (4 bytes written and read per key) are not counted. GB/s = bytes / time and % of the
device's peak HBM bandwidth (`baselines.PEAK_HBM`), for the end-to-end time and the scores alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.index_decode import api, reference
from pallas_kernels.topk import api as topk_api

HEADS, DIM, TOPK, PAGE = 64, 128, 2048, 64
BATCHES = (1, 32, 128)


def bytes_moved(rows: int, keys: int, fp8: bool) -> int:
  """The bytes the scores of one decode step read (module docstring)."""
  if fp8:
    return rows * keys * (DIM + 4) + rows * HEADS * (DIM + 8)
  return rows * keys * 2 * DIM + rows * HEADS * (2 * DIM + 4)


def inputs(S: int, rows: int, fp8: bool, seed: int = 0) -> dict:  # noqa: N803
  """`api.index_decode_topk`'s arguments: `rows` sequences of S keys, their pages shuffled over the pool."""
  ks = jax.random.split(jax.random.key(seed), 6)
  pages = rows * -(-S // PAGE)
  dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  perm = np.random.default_rng(seed).permutation(pages).reshape(rows, -1)
  scale = lambda key, shape: jax.random.uniform(key, shape, minval=0.01, maxval=0.1) if fp8 else None
  return dict(q=jax.random.normal(ks[0], (rows, HEADS, DIM)).astype(dtype), q_scale=scale(ks[1], (rows, HEADS)),
              weights=jax.random.normal(ks[2], (rows, HEADS)) * (HEADS * DIM) ** -0.5,
              idx_k=jax.random.normal(ks[3], (pages * PAGE, DIM)).astype(dtype),
              idx_scale=scale(ks[4], (pages * PAGE,)), block_table=jnp.asarray(perm, jnp.int32),
              lengths=jnp.full((rows,), S, jnp.int32))


def _topk(implementation):
  return jax.jit(lambda a: api.index_decode_topk(**a, k=TOPK, page_size=PAGE, implementation=implementation))


def _scores_fn():
  return jax.jit(lambda a: api.index_decode_scores(**a, page_size=PAGE, implementation="pallas"))


def _rates(prefix: str, seconds: float, moved: int, peak: float | None) -> dict:
  return {f"{prefix}_s": seconds, f"{prefix}_gbps": moved / seconds / 1e9,
          f"{prefix}_pct_peak": None if peak is None else 100 * moved / seconds / peak}


def _row(S: int, rows: int, peak: float | None) -> dict:  # noqa: N803
  args = inputs(S, rows, fp8=True)
  moved = bytes_moved(rows, S, fp8=True)
  row = dict(section="index_decode", S=S, Q=rows, k=TOPK, bytes=moved)
  pallas = _topk("pallas")
  row.update(_rates("pallas", timing.time_fn(pallas, args), moved, peak))
  scores_fn = _scores_fn()
  row.update(_rates("scores", timing.time_fn(scores_fn, args), moved, peak))
  scores = scores_fn(args)
  select = jax.jit(lambda s: reference.select(s, TOPK, lambda x, n: topk_api.topk_indices(x, n, "pallas")))
  row["select_s"] = timing.time_fn(select, scores)
  # The XLA reference holds bf16 keys [Q, S, H] and float32 logits [Q, I, S] (twice, with the ReLU).
  if timing.fits(f"the XLA index_decode_topk at S={S}, Q={rows}", rows * S * (2 * DIM + 8 * HEADS + 16)):
    xla = _topk("xla")
    row["xla_s"] = timing.time_fn(xla, args)
    row["speedup_vs_xla"] = row["xla_s"] / row["pallas_s"]
    got, want = pallas(args), xla(args)
    row["rows_same_selection"] = float(np.mean(np.all(np.asarray(got[0] == want[0]), axis=1)))
    exact = reference.index_decode_scores(**args, page_size=PAGE)
    row["scores_rel_err"] = float(jnp.max(jnp.abs(scores - exact)) / jnp.max(jnp.abs(exact)))
  bf16 = inputs(S, rows, fp8=False)
  row.update(_rates("scores_bf16", timing.time_fn(scores_fn, bf16), bytes_moved(rows, S, fp8=False), peak))
  return row


def run(cfg: dict) -> list[dict]:
  """cfg["seq_lens"]: context lengths S. Returns one row per (S, Q)."""
  peak = baselines.peak_hbm()
  out = []
  for S in cfg["seq_lens"]:  # noqa: N806
    for rows in BATCHES:
      # The FP8 and bf16 pools and the [Q, S] scores with the select's intermediates (~8 copies).
      if not timing.fits(f"index_decode at S={S}, Q={rows}", rows * S * (DIM + 4 + 2 * DIM + 32)):
        continue
      row = _row(S, rows, peak)
      timing.emit(out, row)
  return out


SECTIONS = {"index_decode": run}
