"""Benchmark section: lightning-indexer scores + top-k selection at V3.2 shapes (issue 3 targets).

Per sequence length T (batch 1, causal, 64 index heads x 128, k = 2048):
- `index_topk` end to end, Pallas path (Mosaic GPU scores per row block + radix select), against the
  matmul floor: 2 * 64 * 128 * T(T+1)/2 FLOP at the XLA bf16 matmul rate measured in the same run;
- the scores kernel alone on the last 4096 query rows (all keys visible), in TFLOP/s;
- radix select vs `lax.top_k` on the same 1024 random rows of T float32 scores (exactness and speed);
- the XLA reference `index_topk` where it fits (T <= 8192: it materialises [T, I, S]);
- cuDNN dense causal MLA attention of the same layer (128 heads, q/k 192, v 128) for scale;
- peak device memory of the Pallas `index_topk` (XLA memory analysis).
"""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_sections import baselines, timing
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.topk import kernel as topk_kernel
from pallas_kernels.topk import reference as topk_reference

HEADS, DIM, TOPK = 64, 128, 2048
SCORE_ROWS, TOPK_ROWS = 4096, 1024


def _inputs(T: int, seed: int = 0):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (1, T, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, DIM), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, T, HEADS), jnp.float32) * (HEADS * DIM) ** -0.5
  positions = jnp.arange(T, dtype=jnp.int32)[None]
  return (q, k, w), dict(q_positions=positions, kv_positions=positions, q_segment_ids=jnp.zeros_like(positions),
                         kv_segment_ids=jnp.zeros_like(positions))


def _index_topk(implementation):
  return jax.jit(lambda q, k, w, vis: indexer_api.index_topk(q, k, w, topk=TOPK, **vis,
                                                              implementation=implementation))


def _scores_block_check(args, vis, rows: int):
  """Scores kernel on the last `rows` queries: seconds, TFLOP/s, max |error| / max |score| vs reference."""
  q, k, w = args
  block_vis = dict(vis, q_positions=vis["q_positions"][:, -rows:], q_segment_ids=vis["q_segment_ids"][:, -rows:])
  block = (q[:, -rows:], k, w[:, -rows:])
  pallas = jax.jit(lambda *a: indexer_api.index_scores(*a, **block_vis, implementation="pallas"))
  seconds = timing.time_fn(pallas, *block)
  check = min(256, rows)  # the reference materialises [check, I, S]
  got = pallas(*block)[:, -check:]
  want = indexer_reference.index_scores(q[:, -check:], k, w[:, -check:], **dict(
      block_vis, q_positions=vis["q_positions"][:, -check:], q_segment_ids=vis["q_segment_ids"][:, -check:]))
  finite = jnp.isfinite(want)
  err = float(jnp.max(jnp.where(finite, jnp.abs(got - want), 0.0)) / jnp.max(jnp.where(finite, jnp.abs(want), 0.0)))
  same_mask = bool(jnp.array_equal(finite, jnp.isfinite(got)))
  flops = 2.0 * HEADS * DIM * rows * k.shape[1]
  return seconds, timing.tflops(flops, seconds), err, same_mask


def _topk_check(T: int):  # noqa: N803
  scores = jax.random.normal(jax.random.key(3), (TOPK_ROWS, T), jnp.float32)
  radix = jax.jit(lambda x: topk_kernel.topk_indices(x, TOPK))
  exact = bool(jnp.array_equal(radix(scores), topk_reference.topk_indices(scores, TOPK)))
  return timing.time_fn(radix, scores), baselines.lax_topk_seconds(TOPK_ROWS, T, TOPK), exact


def run(cfg: dict) -> list[dict]:
  """cfg["seq_lens"]: sequence lengths. Returns one row per length."""
  rate = baselines.matmul_tflops()
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    args, vis = _inputs(T)
    flops = 2.0 * HEADS * DIM * T * (T + 1) / 2
    fused = _index_topk("pallas")
    seconds = timing.time_fn(fused, *args, vis, warmup=1, iters=3)
    row = dict(section="indexer_topk", T=T, matmul_tflops=rate, floor_s=flops / (rate * 1e12),
               index_topk_pallas_s=seconds, vs_floor=seconds / (flops / (rate * 1e12)),
               index_topk_peak_gib=(timing.peak_bytes_of(fused, *args, vis) or float("nan")) / 2**30)
    scores_s, scores_tf, err, same_mask = _scores_block_check(args, vis, min(SCORE_ROWS, T))
    row.update(scores_block_s=scores_s, scores_tflops=scores_tf, scores_rel_err=err, scores_mask_ok=same_mask)
    radix_s, lax_s, exact = _topk_check(T)
    row.update(radix_topk_1024rows_s=radix_s, lax_topk_1024rows_s=lax_s, topk_speedup=lax_s / radix_s,
               radix_exact=exact)
    if T <= 8192:
      reference = _index_topk("xla")
      row["index_topk_xla_s"] = timing.time_fn(reference, *args, vis, warmup=1, iters=3)
      got, want = np.asarray(fused(*args, vis)), np.asarray(reference(*args, vis))
      row["rows_same_selection"] = float(np.mean([np.array_equal(a, b) for a, b in zip(got[0], want[0])]))
    row["cudnn_dense_mla_s"] = baselines.cudnn_dense_mla_layer_seconds(T)
    print(row, flush=True)
    rows.append(row)
  return rows
