"""Benchmark section: tile sweep of the grouped-matmul kernels (issue 4: >= 350 TF/s on the expert GEMMs).

With jax's bundled kernels an H200 runs the up projection forward at 411 TF/s but the down forward and the up dgrad
(both [M, 2048] x [2048, 7168]) near 260 TF/s at 512 rows per expert, and 148-234 TF/s at 128 rows per expert
(session 8's `kernel_scheduled`, the default from 64 experts since, was the fix; this sweep keeps the bundled
kernels, `gmm_kernel="bundled"`). This section times `kernel.gmm` (forward; dgrad = `gmm(dy, w, gs,
transpose_w=True)`) and `kernel.tgmm` (wgrad) for a few legal tile configurations on the "256x4096" and "256x16384"
loads of `moe_gmm` (same group sizes, shapes and TF/s of useful FLOPs 2 * M * D * F), to see how much of the gap the
tiles alone close. Candidates (block_m, block_n, block_k, max_concurrent_steps) follow the bundled kernels'
limits: one warpgroup holds the block_m x block_n f32 accumulator (block_m * block_n / 128 registers per
thread: 128 x 256 and 256 x 128 cannot fit, 192-wide tiles are at the edge), the pipeline's
max_concurrent_steps * (block_m + block_n) * block_k * 2 bytes must fit 227 KiB of SMEM (the block_m x
block_n output staging is a later scope that reuses it: 128 x 128 x 64 lowers with 7 steps, not 8), and
wgrad needs block_k a multiple of 64 (its masks are WGMMA-layout registers) and block_m / block_n dividing
D / F (for wgrad, block_m tiles D, block_n tiles F and block_k the expert rows). The first candidate of
each pass is the default; `vs_default` is its time over the candidate's. A candidate that fails to lower,
compile (ptxas) or run becomes a row with `error` and the sweep goes on. Where block_n does not divide the
output width, w is padded once outside the timing (`n_pad`): `kernel.gmm` would otherwise copy the whole
weight tensor into a padded one on every call, a wrapper cost that says nothing about the tiles. rel_err:
max |error| / max |reference| on the first experts against a dense f32 product. Timing uses few iterations
(about 80 compiles in all).
"""

import jax
import jax.numpy as jnp

from experiments.bench_sections import moe_gmm
from pallas_kernels.benchmarking import timing
from pallas_kernels.moe_gmm import kernel

CASE_NAMES = ("256x4096", "256x16384")
WARMUP, ITERS = 0, 5  # the checked call before the timing is the warm-up
_DEFAULT = kernel.Tiles()
# (block_m, block_n, block_k, max_concurrent_steps): pipeline SMEM KiB, accumulator registers per thread.
GMM_CANDIDATES = tuple(dict.fromkeys((
    (_DEFAULT.block_m, _DEFAULT.block_n, _DEFAULT.block_k, _DEFAULT.max_concurrent_steps),
    (128, 128, 64, 7),  # 224 KiB, 128: the deepest pipeline that fits
    (128, 128, 128, 3),  # 192 KiB, 128: half the k-steps (barrier waits), 1.5x the bytes in flight
    (64, 256, 64, 4),  # 160 KiB, 128: same accumulator, half the rows wasted in blocks two groups share
    (64, 128, 64, 6),  # 144 KiB, 64: least row waste at 128 rows per expert
    (128, 192, 64, 4),  # 160 KiB, 192: 1.5x the work per tile prologue / epilogue; N padded
    (192, 128, 64, 4),  # 160 KiB, 192: the same along M, no padding, more rows wasted per group
)))
TGMM_CANDIDATES = tuple(dict.fromkeys((
    (_DEFAULT.wgrad_block_m, _DEFAULT.wgrad_block_n, _DEFAULT.wgrad_block_k,
     _DEFAULT.wgrad_max_concurrent_steps),
    (128, 128, 64, 7),  # 224 KiB, 128
    (128, 128, 128, 3),  # 192 KiB, 128 (+ a 128 x 128 bf16 mask at group edges): fewer, longer k-steps
    (64, 256, 64, 4),  # 160 KiB, 128
    (256, 64, 64, 4),  # 160 KiB, 128 (+ a 64 x 256 bf16 mask at group edges)
    (64, 128, 64, 4),  # 96 KiB, 64: twice the tiles, each cheaper
)))


def _tiles(pass_: str, cand: tuple[int, int, int, int]) -> kernel.Tiles:
  bm, bn, bk, steps = cand
  if pass_ == "wgrad":
    return kernel.Tiles(wgrad_block_m=bm, wgrad_block_n=bn, wgrad_block_k=bk, wgrad_max_concurrent_steps=steps)
  return kernel.Tiles(gmm_kernel="bundled", block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps)


def _rel_err(got, want) -> float:
  got = got.astype(jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _wgrad_reference(x, dy, gs, experts: int = 3) -> jax.Array:
  """x[rows of e].T @ dy[rows of e] in f32 for the first `experts` groups -> [experts, D, F]."""
  starts = [0] + [int(v) for v in jnp.cumsum(gs[:experts])]
  return jnp.stack([x[s:e].astype(jnp.float32).T @ dy[s:e].astype(jnp.float32)
                    for s, e in zip(starts[:-1], starts[1:])])


def _sweep(case: str, name: str, d: int, f: int, gs: jax.Array) -> list[dict]:
  m, experts = int(gs.sum()), gs.shape[0]
  kx, kw, ky = jax.random.split(jax.random.key(d), 3)  # the inputs of moe_gmm
  x = jax.random.normal(kx, (m, d), jnp.bfloat16)
  w = jax.random.normal(kw, (experts, d, f), jnp.bfloat16) * d**-0.5
  dy = jax.random.normal(ky, (m, f), jnp.bfloat16)
  flops = 2.0 * m * d * f
  want_fwd, n = moe_gmm._reference_rows(x, w, gs)
  want_dgrad, _ = moe_gmm._reference_rows(dy, jnp.swapaxes(w[:3], 1, 2), gs)
  want_wgrad = _wgrad_reference(x, dy, gs)
  base = dict(section="moe_gmm_tiles", case=case, op=name, m=m, d=d, f=f, rows_per_expert=m // experts)
  # pass -> (function of tiles, its arguments, axis of w holding the output columns, output width, check)
  passes = (
      ("fwd", lambda t: lambda x, w, gs: kernel.gmm(x, w, gs, tiles=t), (x, w, gs), 2, f,
       lambda out: _rel_err(out[:n, :f], want_fwd)),
      ("dgrad", lambda t: lambda dy, w, gs: kernel.gmm(dy, w, gs, transpose_w=True, tiles=t), (dy, w, gs), 1, d,
       lambda out: _rel_err(out[:n, :d], want_dgrad)),
      ("wgrad", lambda t: lambda x, dy, gs: kernel.tgmm(x, dy, gs, tiles=t), (x, dy, gs), None, f,
       lambda out: _rel_err(out[:3, :d, :f], want_wgrad)),
  )
  rows = []
  for pass_, make, args, w_axis, width, check in passes:
    candidates = TGMM_CANDIDATES if pass_ == "wgrad" else GMM_CANDIDATES
    default_ms = None
    for cand in candidates:
      bm, bn, bk, steps = cand
      row = dict(base, pass_=pass_, block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps,
                 n_pad=width + -width % bn)
      try:
        call_args = args
        if w_axis is not None and width % bn:  # pad w once here, not in every timed call
          call_args = (args[0], kernel._pad_axis(args[1], w_axis, bn), args[2])
        compiled = jax.jit(make(_tiles(pass_, cand))).lower(*call_args).compile()
        out = jax.block_until_ready(compiled(*call_args))
        seconds = timing.time_fn(compiled, *call_args, warmup=WARMUP, iters=ITERS)
        row.update(ms=seconds * 1e3, tflops=timing.tflops(flops, seconds), rel_err=check(out))
        del out, call_args
      except Exception as e:  # noqa: BLE001  a config that does not lower / compile / run must not stop the sweep
        print(f"[moe_gmm_tiles] {case} {name} {pass_} {cand} failed: {str(e)[:2000]}", flush=True)
        lines = [line for line in str(e).splitlines() if line.strip()]
        row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]
      if cand == candidates[0]:
        default_ms = row.get("ms")
      if default_ms is not None and "ms" in row:
        row["vs_default"] = default_ms / row["ms"]
      rows.append(row)
      print(row, flush=True)
  return rows


def _summary(rows: list[dict]) -> None:
  """Best configuration of each (case, op, pass_) and its speedup over the default tiles."""
  tile = lambda r: (r["block_m"], r["block_n"], r["block_k"], r["max_concurrent_steps"])
  for key in dict.fromkeys((r["case"], r["op"], r["pass_"]) for r in rows):
    group = [r for r in rows if (r["case"], r["op"], r["pass_"]) == key]
    ok = [r for r in group if "ms" in r]
    if not ok:
      print(f"[moe_gmm_tiles] {' '.join(key)}: every candidate failed", flush=True)
      continue
    best, default = max(ok, key=lambda r: r["tflops"]), group[0]
    speedup = f"{default['ms'] / best['ms']:.2f}x" if "ms" in default else "n/a (default failed)"
    print(f"[moe_gmm_tiles] {' '.join(key)}: best {tile(best)} {best['tflops']:.0f} TF/s, default {tile(default)} "
          f"{default.get('tflops', float('nan')):.0f} TF/s, speedup {speedup}", flush=True)


def run(cfg: dict) -> list[dict]:
  del cfg  # the expert shapes and loads (moe_gmm.CASES), not the sequence length, set the GEMM sizes
  rows = []
  for case, tokens, local in moe_gmm.CASES:
    if case not in CASE_NAMES:
      continue
    gs = moe_gmm._group_sizes(0, tokens, local)
    for name, d, f in (("up", moe_gmm.HIDDEN, moe_gmm.EXPERT_HIDDEN), ("down", moe_gmm.EXPERT_HIDDEN, moe_gmm.HIDDEN)):
      rows += _sweep(case, name, d, f, gs)
  _summary(rows)
  return rows
