"""Benchmark section "topk": top-k selection alone and inside `index_topk` (GPU; benchmarks/topk.md).

  python -m experiments.bench_kernels --sections=topk --seq_lens=32768,131072

Per sequence length T (k = 2048):
- ROWS rows of T float32 scores, two kinds: i.i.d. normal, and real causal indexer scores (the last ROWS query
  rows of a random 64 x 128 indexer, so -inf beyond each row's position): `lax.top_k` ("xla") against the
  "pallas" select (`pruned.py`), each checked exact against the reference, also on rows full of ties;
- where the "pallas" select's time goes, on the indexer rows: the XLA group maxima, the first selection (the
  compaction kernel on the maxima) with 1 and 2 bits per bisection step (`kernel_select`: the threshold is
  bitwise the same, `_exact`), and the rest (candidate gather, second selection) as the remainder;
- `index_topk` end to end (Pallas scores per row block) with each selection, against the matmul floor
  2 * 64 * 128 * T(T+1)/2 FLOP at the XLA bf16 matmul rate of the same run.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.topk import api, kernel_compact, pruned, reference

HEADS, DIM, TOPK, ROWS = 64, 128, 2048, 1024
SELECTS = ("xla", "pallas")


def indexer_inputs(T: int):  # noqa: N803
  """A random 64 x 128 indexer over one causal document of T tokens -> ((q, k, w), visibility)."""
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, T, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, DIM), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, T, HEADS), jnp.float32) * (HEADS * DIM) ** -0.5
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  vis = dict(q_positions=pos, kv_positions=pos, q_segment_ids=jnp.zeros_like(pos), kv_segment_ids=jnp.zeros_like(pos))
  return (q, k, w), vis


def score_rows(T: int) -> dict[str, jax.Array]:  # noqa: N803
  """Two [ROWS, T] float32 score sets: i.i.d. normal, and the last ROWS rows of causal indexer scores."""
  (q, k, w), vis = indexer_inputs(T)
  rows = min(ROWS, T)
  last = dict(vis, q_positions=vis["q_positions"][:, -rows:], q_segment_ids=vis["q_segment_ids"][:, -rows:])
  indexer = indexer_api.index_scores(q[:, -rows:], k, w[:, -rows:], **last)[0]
  return {"normal": jax.random.normal(jax.random.key(3), (rows, T), jnp.float32), "indexer": indexer}


def _breakdown(scores: jax.Array) -> dict:
  """Milliseconds of the "pallas" select's steps on `scores` [R, S] (module docstring)."""
  g = pruned.group_size(scores.shape[-1], TOPK)
  maxima_fn = jax.jit(lambda x: pruned.group_keys(x, g).max(axis=-1))
  maxima = maxima_fn(scores)
  first = {b: jax.jit(lambda m, b=b: kernel_compact.topk_positions(m, TOPK, bits_per_step=b)) for b in (1, 2)}
  whole = jax.jit(lambda x: api.topk_indices(x, TOPK, implementation="pallas"))
  times = dict(group_max=timing.time_fn(maxima_fn, scores), first_selection=timing.time_fn(first[1], maxima),
               first_selection_b2=timing.time_fn(first[2], maxima), whole=timing.time_fn(whole, scores))
  times["candidates_rest"] = times["whole"] - times["group_max"] - times["first_selection"]
  out = {f"indexer_pallas_{name}_ms": seconds * 1e3 for name, seconds in times.items()}
  out["indexer_pallas_first_selection_b2_exact"] = bool(jnp.array_equal(first[2](maxima), first[1](maxima)))
  return out


def _selection_rows(T: int) -> dict:  # noqa: N803
  row = {}
  for kind, scores in score_rows(T).items():
    want = reference.topk_indices(scores, TOPK)
    for select in SELECTS:
      fn = jax.jit(lambda x, s=select: api.topk_indices(x, TOPK, implementation=s))
      row[f"{kind}_{select}_ms"] = timing.time_fn(fn, scores) * 1e3
      row[f"{kind}_{select}_exact"] = bool(jnp.array_equal(fn(scores), want))
    row[f"{kind}_pallas_speedup"] = row[f"{kind}_xla_ms"] / row[f"{kind}_pallas_ms"]
    if kind == "indexer":
      row.update(_breakdown(scores))
    else:  # ties everywhere (scores in steps of 1/2, a quarter -inf): the tie rules of the kernels
      tied = jnp.where(jax.random.uniform(jax.random.key(5), scores.shape) < 0.25, -jnp.inf, jnp.round(scores * 2) / 2)
      got = jax.jit(lambda x: api.topk_indices(x, TOPK, implementation="pallas"))(tied)
      row["tied_pallas_exact"] = bool(jnp.array_equal(got, reference.topk_indices(tied, TOPK)))
  return row


def _index_topk_rows(T: int, rate: float) -> dict:  # noqa: N803
  args, vis = indexer_inputs(T)
  floor = 2.0 * HEADS * DIM * T * (T + 1) / 2 / (rate * 1e12)
  row, selections = dict(matmul_tflops=rate, floor_s=floor), {}
  for select in SELECTS:
    fn = jax.jit(lambda q, k, w, vis, s=select: indexer_api.index_topk(
        q, k, w, topk=TOPK, **vis, implementation="pallas", select_implementation=s))
    row[f"index_topk_{select}_select_s"] = timing.time_fn(fn, *args, vis, warmup=1, iters=3)
    row[f"index_topk_{select}_select_vs_floor"] = row[f"index_topk_{select}_select_s"] / floor
    selections[select] = fn(*args, vis)
  row["index_topk_same_selection"] = bool(jnp.array_equal(selections["xla"], selections["pallas"]))
  return row


def run(cfg: dict) -> list[dict]:
  rate = baselines.matmul_tflops()
  out = []
  for T in cfg["seq_lens"]:  # noqa: N806
    # Score rows, their keys and the selections' intermediates: about 8 copies of [ROWS, T] float32; index_topk:
    # the indexer inputs and 2 GiB row blocks of scores (a few live at once).
    if not timing.fits(f"topk at T={T}", 8 * 4 * ROWS * T + T * (HEADS * DIM * 2 + 1024) + 8 * 2**30):
      continue
    row = dict(section="topk", T=T, rows=min(ROWS, T), k=TOPK, **_selection_rows(T), **_index_topk_rows(T, rate))
    timing.emit(out, row)
  return out


SECTIONS = {"topk": run}

