"""Benchmark section: lightning-indexer scores + top-k selection at V3.2 shapes (issue 3 targets).

Per sequence length T (batch 1, causal, 64 index heads x 128, k = 2048):
- `index_topk` end to end, Pallas path (Mosaic GPU scores per row block + the default selection, the row blocks in
  causal key-prefix stages), against the matmul floor: 2 * 64 * 128 * T(T+1)/2 FLOP at the XLA bf16 matmul rate
  measured in the same run; and with every row block over all keys (`causal_prefix=False`: time, same indices);
- the scores kernel alone on the last 4096 query rows (all keys visible), in TFLOP/s, bf16 (with the default
  pipeline options and the others of `SCORE_VARIANTS`, rows `scores_h{heads per step}_s{query buffers}_*`) and
  FP8 (e4m3 wgmma on the same inputs quantised with ue8m0 row scales; error against the f32 reference of the
  dequantised inputs; options `FP8_SCORE_VARIANTS`, rows `scores_fp8_h{h}_s{s}_*`), and `index_topk(fp8=True)`
  end to end with its peak memory;
- radix select vs `lax.top_k` on the same 1024 random rows of T float32 scores (exactness and speed);
- the XLA reference `index_topk` where it fits (T <= 8192: it materialises [T, I, S]);
- cuDNN dense causal MLA attention of the same layer (128 heads, q/k 192, v 128) for scale;
- peak device memory of the Pallas `index_topk` (XLA memory analysis).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.lightning_indexer import kernel as indexer_kernel
from pallas_kernels.lightning_indexer import kernel_fp8
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


def _index_topk(implementation, fp8: bool = False, causal_prefix: bool | None = None):
  return jax.jit(lambda q, k, w, vis: indexer_api.index_topk(q, k, w, topk=TOPK, **vis, implementation=implementation,
                                                              fp8=fp8, causal_prefix=causal_prefix))


def _scores_block_check(scores, t_args: dict, s_args: dict, vis: dict, rows: int):
  """A scores kernel on the last `rows` queries (all keys visible) -> (seconds, TFLOP/s, error, same mask).

  `scores(**t_args, **s_args, **vis, implementation=)`: an `indexer_api` scores function; t_args are indexed
  by query, s_args by key. Error: max |pallas - xla| / max |xla| (float32 reference) on the last 256 rows.
  """

  def last(n):
    q_vis = dict(vis, q_positions=vis["q_positions"][:, -n:], q_segment_ids=vis["q_segment_ids"][:, -n:])
    return {name: x[:, -n:] for name, x in t_args.items()}, s_args, q_vis

  run = lambda implementation: jax.jit(lambda t, s, v: scores(**t, **s, **v, implementation=implementation))
  pallas = run("pallas")
  seconds = timing.time_fn(pallas, *last(rows))
  check = min(256, rows)  # the reference materialises [check, I, S]
  got = pallas(*last(rows))[:, -check:]
  want = run("xla")(*last(check))
  finite = jnp.isfinite(want)
  err = float(jnp.max(jnp.where(finite, jnp.abs(got - want), 0.0)) / jnp.max(jnp.where(finite, jnp.abs(want), 0.0)))
  same_mask = bool(jnp.array_equal(finite, jnp.isfinite(got)))
  flops = 2.0 * HEADS * DIM * rows * vis["kv_positions"].shape[1]
  return seconds, timing.tflops(flops, seconds), err, same_mask


def _fp8_checks(args, vis, rows: int) -> dict:
  """The FP8 scores kernel on the last `rows` queries of the same inputs, and `index_topk(fp8=True)`."""
  q, k, w = args
  q8, q_scale, k8, k_scale = indexer_api.quantize_fp8(q, k)
  seconds, tflops, err, same_mask = _scores_block_check(
      indexer_api.index_scores_fp8, dict(q8=q8, q_scale=q_scale, w=w), dict(k8=k8, k_scale=k_scale), vis, rows)
  fused = _index_topk("pallas", fp8=True)
  return dict(scores_fp8_block_s=seconds, scores_fp8_tflops=tflops, scores_fp8_rel_err=err,
              scores_fp8_mask_ok=same_mask,
              index_topk_fp8_pallas_s=timing.time_fn(fused, *args, vis, warmup=1, iters=3),
              index_topk_fp8_peak_gib=(timing.peak_bytes_of(fused, *args, vis) or float("nan")) / 2**30,
              **_variant_rows("scores_fp8", FP8_SCORE_VARIANTS, _fp8_scores_variant,
                              dict(q8=q8, q_scale=q_scale, w=w), dict(k8=k8, k_scale=k_scale), vis, rows))


def _topk_check(T: int):  # noqa: N803
  scores = jax.random.normal(jax.random.key(3), (TOPK_ROWS, T), jnp.float32)
  radix = jax.jit(lambda x: topk_kernel.topk_indices(x, TOPK))
  exact = bool(jnp.array_equal(radix(scores), topk_reference.topk_indices(scores, TOPK)))
  return timing.time_fn(radix, scores), baselines.lax_topk_seconds(TOPK_ROWS, T, TOPK), exact


# Scores kernel options (heads per pipeline step, query buffers, key warpgroups) timed beside the default:
# `scores_h{h}_s{s}_*` for bf16, `scores_fp8_h{h}_s{s}_*` for FP8, with `_k2` appended for two key warpgroups.
SCORE_VARIANTS = ((1, 4, 1), (2, 2, 1), (2, 2, 2), (1, 4, 2))
FP8_SCORE_VARIANTS = ((1, 4, 1), (2, 2, 1), (2, 2, 2), (2, 4, 2))


def _scores_variant(heads_per_step: int, steps: int, key_warpgroups: int):
  """`index_scores` whose "pallas" runs the bf16 kernel with these options (its "xla" unchanged)."""
  def scores(q, k, w, *, implementation, **vis):
    if implementation == "xla":
      return indexer_api.index_scores(q, k, w, **vis, implementation="xla")
    return indexer_kernel.index_scores(q, k, w, **vis, max_concurrent_steps=steps, heads_per_step=heads_per_step,
                                       key_warpgroups=key_warpgroups)
  return scores


def _fp8_scores_variant(heads_per_step: int, steps: int, key_warpgroups: int):
  """`index_scores_fp8` whose "pallas" runs the FP8 kernel with these options (padded shapes only: T % 256 == 0)."""
  def scores(q8, q_scale, k8, k_scale, w, *, implementation, **vis):
    if implementation == "xla":
      return indexer_api.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis, implementation="xla")
    return kernel_fp8.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis, max_concurrent_steps=steps,
                                       heads_per_step=heads_per_step, key_warpgroups=key_warpgroups)
  return scores


def _variant_rows(prefix: str, variants, make, t_args: dict, s_args: dict, vis: dict, rows: int) -> dict:
  """One `_scores_block_check` per (heads per step, buffers, key warpgroups) option; a variant that fails must not
  cost the row."""
  out = {}
  for heads_per_step, steps, key_warpgroups in variants:
    name = f"{prefix}_h{heads_per_step}_s{steps}" + ("_k2" if key_warpgroups == 2 else "")
    try:
      got = _scores_block_check(make(heads_per_step, steps, key_warpgroups), t_args, s_args, vis, rows)
    except Exception as e:  # noqa: BLE001
      out[f"{name}_error"] = str(e).splitlines()[0][:200]
      continue
    out.update(dict(zip((f"{name}_block_s", f"{name}_tflops", f"{name}_rel_err", f"{name}_mask_ok"), got)))
  return out


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
    full = _index_topk("pallas", causal_prefix=False)  # every row block over all S keys
    row["index_topk_all_keys_s"] = timing.time_fn(full, *args, vis, warmup=1, iters=3)
    row["causal_prefix_speedup"] = row["index_topk_all_keys_s"] / seconds
    row["causal_prefix_same"] = bool(jnp.array_equal(fused(*args, vis), full(*args, vis)))
    q, k, w = args
    scores_s, scores_tf, err, same_mask = _scores_block_check(indexer_api.index_scores, dict(q=q, w=w), dict(k=k),
                                                              vis, min(SCORE_ROWS, T))
    row.update(scores_block_s=scores_s, scores_tflops=scores_tf, scores_rel_err=err, scores_mask_ok=same_mask)
    row.update(_variant_rows("scores", SCORE_VARIANTS, _scores_variant, dict(q=q, w=w), dict(k=k), vis,
                             min(SCORE_ROWS, T)))
    row.update(_fp8_checks(args, vis, min(SCORE_ROWS, T)))
    row["scores_fp8_speedup"] = scores_s / row["scores_fp8_block_s"]
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
