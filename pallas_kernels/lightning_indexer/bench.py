"""Benchmark section "index_topk": lightning-indexer scores + top-k selection at V3.2 shapes (GPU;
benchmarks/index_topk.md).

  python -m experiments.bench_kernels --sections=index_topk --seq_lens=8192,32768,131072

Per sequence length T (batch 1, one causal document, 64 index heads x 128, k = 2048):
- `index_topk` end to end, "pallas" (Mosaic GPU scores per row block + the pruned select, the row blocks in
  causal key-prefix stages), against the matmul floor 2 * 64 * 128 * T(T+1)/2 FLOP at the XLA bf16 matmul rate
  measured in the same run, with its peak memory; and with every row block over all keys (`causal_prefix=False`:
  time, same indices);
- the scores kernel alone on the last SCORE_ROWS query rows (all keys visible), in TFLOP/s, bf16 and FP8 (e4m3
  wgmma on the same inputs quantised with ue8m0 row scales), each with one and two key warpgroups (the automatic
  choice takes two at these shapes); error against the float32 reference of the same (dequantised) inputs on
  the last 256 rows, and whether the -inf mask is the same; `index_topk(fp8=True)` end to end with its peak memory;
- the XLA reference `index_topk` where it fits (it materialises [T, I, S] float32 logits), and the share of rows
  whose selections equal it;
- cuDNN dense causal MLA attention of the same layer (128 heads, q/k 192, v 128) for scale.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer import api, kernel, kernel_fp8

HEADS, DIM, TOPK = 64, 128, 2048
SCORE_ROWS = 4096


def _inputs(T: int, seed: int = 0):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (1, T, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, DIM), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, T, HEADS), jnp.float32) * (HEADS * DIM) ** -0.5
  positions = jnp.arange(T, dtype=jnp.int32)[None]
  return (q, k, w), dict(q_positions=positions, kv_positions=positions, q_segment_ids=jnp.zeros_like(positions),
                         kv_segment_ids=jnp.zeros_like(positions))


def _index_topk(implementation, fp8: bool = False, causal_prefix: bool | None = None):
  return jax.jit(lambda q, k, w, vis: api.index_topk(q, k, w, topk=TOPK, **vis, implementation=implementation,
                                                     fp8=fp8, causal_prefix=causal_prefix))


def _last_rows(t_args: dict, vis: dict, n: int):
  q_vis = dict(vis, q_positions=vis["q_positions"][:, -n:], q_segment_ids=vis["q_segment_ids"][:, -n:])
  return {name: x[:, -n:] for name, x in t_args.items()}, q_vis


def _scores_rows(prefix: str, kernel_fn, reference_fn, t_args: dict, s_args: dict, vis: dict) -> dict:
  """A scores kernel on the last SCORE_ROWS queries with each key_warpgroups option -> seconds, TFLOP/s, error
  (max |kernel - reference| / max |reference| on the last 256 rows), same mask. kernel_fn(**t, **s, **vis,
  key_warpgroups=) and reference_fn(**t, **s, **vis): scores functions; t_args are indexed by query, s_args by key."""
  rows = min(SCORE_ROWS, vis["q_positions"].shape[1])
  check = min(256, rows)
  want = jax.jit(lambda t, v: reference_fn(**t, **s_args, **v))(*_last_rows(t_args, vis, check))
  finite = jnp.isfinite(want)
  out = {}
  for key_warpgroups in kernel.KEY_WARPGROUPS:
    name = f"{prefix}_k{key_warpgroups}"
    fn = jax.jit(lambda t, v, kwg=key_warpgroups: kernel_fn(**t, **s_args, **v, key_warpgroups=kwg))
    seconds = timing.time_fn(fn, *_last_rows(t_args, vis, rows))
    got = fn(*_last_rows(t_args, vis, rows))[:, -check:]
    err = jnp.max(jnp.where(finite, jnp.abs(got - want), 0.0)) / jnp.max(jnp.where(finite, jnp.abs(want), 0.0))
    out.update({f"{name}_block_s": seconds,
                f"{name}_tflops": timing.tflops(2.0 * HEADS * DIM * rows * vis["kv_positions"].shape[1], seconds),
                f"{name}_rel_err": float(err), f"{name}_mask_ok": bool(jnp.array_equal(finite, jnp.isfinite(got)))})
  return out


def _index_topk_rows(args, vis) -> dict:
  fused = _index_topk("pallas")
  row = dict(index_topk_pallas_s=timing.time_fn(fused, *args, vis, warmup=1, iters=3),
             index_topk_peak_gib=(timing.peak_bytes_of(fused, *args, vis) or float("nan")) / 2**30)
  full = _index_topk("pallas", causal_prefix=False)  # every row block over all S keys
  row["index_topk_all_keys_s"] = timing.time_fn(full, *args, vis, warmup=1, iters=3)
  row["causal_prefix_speedup"] = row["index_topk_all_keys_s"] / row["index_topk_pallas_s"]
  row["causal_prefix_same"] = bool(jnp.array_equal(fused(*args, vis), full(*args, vis)))
  fp8 = _index_topk("pallas", fp8=True)
  row.update(index_topk_fp8_pallas_s=timing.time_fn(fp8, *args, vis, warmup=1, iters=3),
             index_topk_fp8_peak_gib=(timing.peak_bytes_of(fp8, *args, vis) or float("nan")) / 2**30)
  T = vis["q_positions"].shape[1]  # noqa: N806
  if timing.fits(f"the XLA reference index_topk at T={T}", 4 * HEADS * T * T * 1.5):  # [T, I, S] float32 logits
    reference = _index_topk("xla")
    row["index_topk_xla_s"] = timing.time_fn(reference, *args, vis, warmup=1, iters=3)
    got, want = np.asarray(fused(*args, vis)), np.asarray(reference(*args, vis))
    row["rows_same_selection"] = float(np.mean([np.array_equal(a, b) for a, b in zip(got[0], want[0])]))
  return row


def run(cfg: dict) -> list[dict]:
  """cfg["seq_lens"]: sequence lengths. Returns one row per length."""
  rate = baselines.matmul_tflops()
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    # The inputs (16 KiB of queries per token), 2 GiB row blocks of scores, the scores kernel's [SCORE_ROWS, T]
    # outputs and the float32 reference's [256, I, T] logits.
    if not timing.fits(f"index_topk at T={T}", T * (HEADS * DIM * 2 + 1024) + 6 * 2**30
                       + 4 * T * (4 * SCORE_ROWS + 256 * HEADS)):
      continue
    args, vis = _inputs(T)
    floor = 2.0 * HEADS * DIM * T * (T + 1) / 2 / (rate * 1e12)
    row = dict(section="index_topk", T=T, matmul_tflops=rate, floor_s=floor, **_index_topk_rows(args, vis))
    row["vs_floor"] = row["index_topk_pallas_s"] / floor
    q, k, w = args
    row.update(_scores_rows("scores", kernel.index_scores,
                            lambda **a: api.index_scores(**a, implementation="xla"),
                            dict(q=q, w=w), dict(k=k), vis))
    q8, q_scale, k8, k_scale = api.quantize_fp8(q, k)
    row.update(_scores_rows("scores_fp8", kernel_fp8.index_scores_fp8,
                            lambda **a: api.index_scores_fp8(**a, implementation="xla"),
                            dict(q8=q8, q_scale=q_scale, w=w), dict(k8=k8, k_scale=k_scale), vis))
    row["cudnn_dense_mla_s"] = baselines.cudnn_dense_mla_layer_seconds(T)
    timing.emit(rows, row)
  return rows


SECTIONS = {"index_topk": run}
