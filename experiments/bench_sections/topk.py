"""Benchmark section: top-k selection alone and inside `index_topk` (issue 3 targets).

Per sequence length T (k = 2048):
- 1024 rows of T float32 scores, two kinds: i.i.d. normal, and real causal indexer scores (the last 1024
  query rows of a random 64 x 128 indexer, so -inf beyond each row's position): `lax.top_k` vs the radix
  select vs the pruned select (inner selections by lax.top_k, by the radix select, by the Mosaic GPU
  threshold kernel `kernel_select`, and "pruned_group_select": the same with step 1 and the first threshold
  fused into the Mosaic GPU kernel `kernel_group_select`, and "pruned_fused_select": each selection's
  compaction inside the threshold kernel, `kernel_compact`), each checked exact against the reference;
- where the pruned_select's time goes, on the indexer rows (`_breakdown`): step 1 (group maxima, one read of
  the rows), the threshold kernel alone on the maxima, the first selection (threshold + compaction into the
  kept groups; `first_selection_fused`: the same by `kernel_compact`, with an `_exact` flag), and the rest (candidate gather, second threshold, compaction) as the remainder; and the fused
  kernel alone (`group_max_and_threshold`, to compare with group_max + threshold_on_maxima; its default
  16 KiB chunks, 2 CTAs per SM, and `_c16384`: 64 KiB chunks, 1 CTA per SM). The threshold kernel also with
  its counting options (`kernel_select`): `_b2` / `_b4` decide 2 / 4 bits per bisection step (16 / 8 steps,
  2^b - 1 counts reduced together), `_b1_p4` 1 bit in 4 partial sums (stacked counting); each with an
  `_exact` flag (bitwise the default's thresholds);
- `index_topk` end to end (Pallas scores per row block) with lax.top_k vs pruned_select vs pruned_fused_select,
  against the matmul floor 2 * 64 * 128 * T(T+1)/2 FLOP at the XLA matmul rate of the same run.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.topk import api as topk_api
from pallas_kernels.topk import kernel, kernel_compact, kernel_group_select, kernel_select, pruned
from pallas_kernels.topk import reference as topk_reference

HEADS, DIM, TOPK, ROWS = 64, 128, 2048, 1024
SELECT_FNS = {name: lambda x, s=name: topk_api.topk_indices(x, TOPK, implementation=s)
              for name in ("xla", "radix", "pruned", "pruned_select", "pruned_group_select", "pruned_fused_select")}
SELECT_FNS["pruned_radix"] = lambda x: pruned.topk_indices(x, TOPK, inner="radix")
SELECTS = tuple(SELECT_FNS)
# Threshold kernel variants timed on the maxima (`_breakdown`): (key suffix, bits_per_step, partial_sums).
THRESHOLD_OPTIONS = (("", 1, None), ("_b2", 2, None), ("_b4", 4, None), ("_b1_p4", 1, 4))


def _indexer_inputs(T: int):  # noqa: N803
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, T, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, DIM), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, T, HEADS), jnp.float32) * (HEADS * DIM) ** -0.5
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  vis = dict(q_positions=pos, kv_positions=pos, q_segment_ids=jnp.zeros_like(pos), kv_segment_ids=jnp.zeros_like(pos))
  return (q, k, w), vis


def score_rows(T: int):  # noqa: N803
  """Two [ROWS, T] float32 score sets: i.i.d. normal, and the last ROWS rows of causal indexer scores."""
  (q, k, w), vis = _indexer_inputs(T)
  rows = min(ROWS, T)
  last = dict(vis, q_positions=vis["q_positions"][:, -rows:], q_segment_ids=vis["q_segment_ids"][:, -rows:])
  indexer = indexer_api.index_scores(q[:, -rows:], k, w[:, -rows:], **last)[0]
  return {"normal": jax.random.normal(jax.random.key(3), (rows, T), jnp.float32), "indexer": indexer}


def _breakdown(scores: jax.Array) -> dict:
  """Milliseconds of the pruned_select's steps on `scores` [R, S] (see the module docstring)."""
  g = pruned.group_size(scores.shape[-1], TOPK)
  maxima = jax.jit(lambda x: pruned.group_maxima(x, g)[1])
  ordered = maxima(scores)
  keys = jax.jit(lambda o: kernel.sortable_keys(pruned.from_ordered(o)))(ordered)
  want = jnp.full((keys.shape[0],), TOPK, jnp.int32)
  first = jax.jit(lambda o: kernel.topk_indices(pruned.from_ordered(o), TOPK,
                                                threshold=kernel_select.kth_largest_keys))
  first_fused = jax.jit(lambda o: kernel_compact.topk_positions(kernel.sortable_keys(pruned.from_ordered(o)), TOPK))
  whole = jax.jit(SELECT_FNS["pruned_select"])
  g_fused = max(g, kernel_group_select.GROUPS[0])  # as pruned's "group_select": g = 2 (T < 16K) becomes 4
  fused = {f"group_max_and_threshold{suffix}": jax.jit(
      lambda x, c=chunk: kernel_group_select.group_maxima_and_threshold(x, g_fused, TOPK, chunk_keys=c))
      for suffix, chunk in (("", kernel_group_select.CHUNK_KEYS), ("_c16384", 16384))}
  thresholds = {f"threshold_on_maxima{suffix}": jax.jit(
      lambda x, w, b=b, p=p: kernel_select.kth_largest_keys(x, w, bits_per_step=b, partial_sums=p))
      for suffix, b, p in THRESHOLD_OPTIONS}
  times = dict(group_max=timing.time_fn(maxima, scores),
               **{name: timing.time_fn(fn, keys, want) for name, fn in thresholds.items()},
               first_selection=timing.time_fn(first, ordered), whole=timing.time_fn(whole, scores),
               first_selection_fused=timing.time_fn(first_fused, ordered),
               **{name: timing.time_fn(fn, scores) for name, fn in fused.items()})
  times["candidates_rest"] = times["whole"] - times["group_max"] - times["first_selection"]
  out = {f"indexer_pruned_select_{name}_ms": seconds * 1e3 for name, seconds in times.items()}
  out["indexer_pruned_select_first_selection_fused_exact"] = bool(jnp.array_equal(first_fused(ordered),
                                                                                   first(ordered)))
  default = thresholds["threshold_on_maxima"](keys, want)
  for name, fn in thresholds.items():  # the counting options must give bitwise the default's thresholds
    if name != "threshold_on_maxima":
      out[f"indexer_pruned_select_{name}_exact"] = bool(jnp.array_equal(fn(keys, want), default))
  return out


def run(cfg: dict) -> list[dict]:
  rate = baselines.matmul_tflops()
  out = []
  for T in cfg["seq_lens"]:  # noqa: N806
    row = dict(section="topk", T=T, rows=min(ROWS, T), k=TOPK)
    for kind, scores in score_rows(T).items():
      want = topk_reference.topk_indices(scores, TOPK)
      for select in SELECTS:
        fn = jax.jit(SELECT_FNS[select])
        row[f"{kind}_{select}_ms"] = timing.time_fn(fn, scores) * 1e3
        row[f"{kind}_{select}_exact"] = bool(jnp.array_equal(fn(scores), want))
      for select in SELECTS[1:]:
        row[f"{kind}_{select}_speedup"] = row[f"{kind}_xla_ms"] / row[f"{kind}_{select}_ms"]
      if kind == "indexer":
        row.update(_breakdown(scores))
      else:  # ties everywhere (scores in steps of 1/2, a quarter -inf): the tie rules of each selection
        tied = jnp.where(jax.random.uniform(jax.random.key(5), scores.shape) < 0.25, -jnp.inf,
                         jnp.round(scores * 2) / 2)
        want_tied = topk_reference.topk_indices(tied, TOPK)
        for select in ("pruned_select", "pruned_fused_select"):
          row[f"tied_{select}_exact"] = bool(jnp.array_equal(jax.jit(SELECT_FNS[select])(tied), want_tied))
    args, vis = _indexer_inputs(T)
    floor = 2.0 * HEADS * DIM * T * (T + 1) / 2 / (rate * 1e12)
    row.update(matmul_tflops=rate, floor_s=floor)
    selections = {}
    for select in ("xla", "pruned_select", "pruned_fused_select"):
      fn = jax.jit(lambda q, k, w, vis, s=select: indexer_api.index_topk(
          q, k, w, topk=TOPK, **vis, implementation="pallas", select_implementation=s))
      row[f"index_topk_{select}_s"] = timing.time_fn(fn, *args, vis, warmup=1, iters=3)
      row[f"index_topk_{select}_vs_floor"] = row[f"index_topk_{select}_s"] / floor
      selections[select] = fn(*args, vis)
    row["index_topk_same_selection"] = all(bool(jnp.array_equal(selections["xla"], v)) for v in selections.values())
    print(row, flush=True)
    out.append(row)
  return out
