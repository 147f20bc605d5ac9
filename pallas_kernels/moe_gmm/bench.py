"""Benchmark sections of the routed experts' grouped matmul (run on the GPU by `experiments/bench_kernels.py`;
tables in benchmarks/moe_gmm.md).

DeepSeek expert shapes, up 7168 -> 2048 and down 2048 -> 7168, 8 active of 256 experts (random routing), for three
loads (CASES):
- "256x4096": all 256 experts on one device, 4096 tokens: 128 rows per expert on average;
- "256x16384": the same with 16384 tokens: 512 rows per expert;
- "ep8_local32": one device of 8-way expert parallelism, its 32 local experts receiving the routed rows of
  8 x 4096 tokens: 1024 rows per expert, the load of real expert-parallel training.
TFLOP/s count the useful FLOPs 2 * M * D * F; errors are max |error| / max |reference| on the first experts' rows
against a dense float32 product per expert. Both kernels run about cdiv(M, block_m) + G row blocks (a block shared
by two groups is computed for each), so at 128 rows per expert about half of the work is masked: the rows per
expert, not only the shapes, set the TF/s.

- "moe_gmm": `kernel.gmm` / `kernel.tgmm` with their default choices (forward and dgrad: ours from
  `kernel.SCHEDULED_MIN_GROUPS` experts, else jax's bundled ragged_dot; wgrad: jax's transposed_ragged_dot), the
  forward and dgrad also with the kernel that `kernel.resolve_gmm_kernel` does not choose for the case (rows
  `impl="pallas_<name>"`), and (first case only) `lax.ragged_dot`, which falls back to a dense computation and
  runs on 1/8 of the rows where that fits `timing.MEMORY_BUDGET_BYTES`.
- "moe_gmm_tiles": a sweep of legal tile configurations of the bundled kernels (forward, dgrad) and of the wgrad
  kernel on the "256x4096" and "256x16384" loads.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from pallas_kernels.moe_gmm import api, kernel

ACTIVE, EXPERTS, HIDDEN, EXPERT_HIDDEN = 8, 256, 7168, 2048
CASES = (("256x4096", 4096, EXPERTS), ("256x16384", 16384, EXPERTS), ("ep8_local32", 8 * 4096, EXPERTS // 8))
PROJECTIONS = (("up", HIDDEN, EXPERT_HIDDEN), ("down", EXPERT_HIDDEN, HIDDEN))


def _group_sizes(seed: int, tokens: int, local_experts: int) -> jax.Array:
  """Rows per expert of the first `local_experts` experts when `tokens` tokens pick ACTIVE of EXPERTS."""
  scores = jax.random.uniform(jax.random.key(seed), (tokens, EXPERTS))
  experts = jax.lax.top_k(scores, ACTIVE)[1].reshape(-1)
  return jnp.bincount(experts, length=EXPERTS)[:local_experts].astype(jnp.int32)


def _inputs(d: int, f: int, gs: jax.Array):
  """x [M, d], w [E, d, f] and dy [M, f] for M = sum(gs) rows (bf16)."""
  m, experts = int(gs.sum()), gs.shape[0]
  kx, kw, ky = jax.random.split(jax.random.key(d), 3)
  x = jax.random.normal(kx, (m, d), jnp.bfloat16)
  w = jax.random.normal(kw, (experts, d, f), jnp.bfloat16) * d**-0.5
  return x, w, jax.random.normal(ky, (m, f), jnp.bfloat16)


def _reference_rows(x, w, gs, experts: int = 3) -> tuple[jax.Array, int]:
  """Rows of the first `experts` groups through a dense f32 matmul per expert (`lax.ragged_dot` itself needs a
  dense [M, E, F]-sized computation at this size on the GPU); -> (rows, their number)."""
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(gs)])
  sizes, offsets = [int(v) for v in gs[:experts]], [int(v) for v in starts[:experts]]
  out = [x[o:o + n].astype(jnp.float32) @ w[e].astype(jnp.float32) for e, (o, n) in enumerate(zip(offsets, sizes))]
  return jnp.concatenate(out), sum(sizes)


def _rel_err(got, want) -> float:
  got = got.astype(jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _gmm_rows(rows: list[dict], base: dict, flops: float, x, w, dy, gs) -> None:
  """Forward and dgrad with the kernel of `tiles` (default: the automatic choice) and the one it does not pick,
  each checked on the first experts' rows against a dense f32 product."""
  chosen = kernel.resolve_gmm_kernel(kernel.Tiles().gmm_kernel, gs.shape[0])
  other = "scheduled" if chosen == "bundled" else "bundled"
  w_t = jnp.swapaxes(w[:3], 1, 2)
  for impl, tiles in (("pallas", kernel.Tiles()), (f"pallas_{other}", kernel.Tiles(gmm_kernel=other))):
    for pass_, fn, args, w_ref in (
        ("fwd", lambda x, w, gs, t=tiles: kernel.gmm(x, w, gs, tiles=t), (x, w, gs), w),
        ("dgrad", lambda dy, w, gs, t=tiles: kernel.gmm(dy, w, gs, transpose_w=True, tiles=t), (dy, w, gs), w_t)):
      f = jax.jit(fn)
      seconds = timing.time_fn(f, *args)
      want, n = _reference_rows(args[0], w_ref, gs)
      timing.emit(rows, dict(base, pass_=pass_, impl=impl, ms=seconds * 1e3, tflops=timing.tflops(flops, seconds),
                       rel_err=_rel_err(f(*args)[:n], want)))


def _rows_for(rows: list[dict], case: str, name: str, d: int, f: int, gs: jax.Array, with_xla: bool) -> None:
  x, w, dy = _inputs(d, f, gs)
  m, experts = x.shape[0], gs.shape[0]
  flops = 2.0 * m * d * f
  base = dict(section="moe_gmm", case=case, op=name, m=m, d=d, f=f, experts=experts, rows_per_expert=m // experts)
  _gmm_rows(rows, base, flops, x, w, dy, gs)
  wgrad = jax.jit(lambda x, dy, gs: kernel.tgmm(x, dy, gs))
  seconds = timing.time_fn(wgrad, x, dy, gs)
  timing.emit(rows, dict(base, pass_="wgrad", impl="pallas", ms=seconds * 1e3, tflops=timing.tflops(flops, seconds)))
  if not with_xla:
    return
  # lax.ragged_dot on 1/8 of the rows (same experts and weights).
  small = m // 8
  small_gs = jnp.bincount(jnp.repeat(jnp.arange(experts), gs, total_repeat_length=m)[::8], length=experts)
  small_gs = small_gs.astype(jnp.int32)
  xla = jax.jit(lambda x, w, gs: api.grouped_matmul(x, w, gs, implementation="xla"))
  if timing.fits_memory(f"lax.ragged_dot, {case} {name} on {small} rows", xla, x[:small], w, small_gs):
    seconds = timing.time_fn(xla, x[:small], w, small_gs)
    timing.emit(rows, dict(base, m=small, pass_="fwd", impl="lax.ragged_dot", ms=seconds * 1e3,
                     tflops=timing.tflops(flops / 8, seconds)))


def run(cfg: dict) -> list[dict]:
  """Section "moe_gmm"."""
  del cfg  # the expert shapes and loads (CASES), not the sequence length, set the GEMM sizes
  rows = []
  for i, (case, tokens, local) in enumerate(CASES):
    gs = _group_sizes(0, tokens, local)
    for name, d, f in PROJECTIONS:
      _rows_for(rows, case, name, d, f, gs, with_xla=i == 0)
  return rows


# The tile sweep: candidates (block_m, block_n, block_k, max_concurrent_steps) within the bundled kernels' limits.
# One warpgroup holds the block_m x block_n f32 accumulator (block_m * block_n / 128 registers per thread: 128 x 256
# and 256 x 128 cannot fit, 192-wide tiles are at the edge); the pipeline's max_concurrent_steps * (block_m +
# block_n) * block_k * 2 bytes must fit 227 KiB of SMEM (the output staging is a later scope that reuses it: 128 x
# 128 x 64 lowers with 7 steps, not 8); wgrad needs block_k a multiple of 64 (its masks are WGMMA-layout registers)
# and block_m / block_n dividing D / F (for wgrad, block_m tiles D, block_n tiles F and block_k the expert rows).
# The first candidate of each pass is the default; `vs_default` is its time over the candidate's.
TILE_CASES = ("256x4096", "256x16384")
TILE_WARMUP, TILE_ITERS = 0, 5  # the checked call before the timing is the warm-up (about 80 compiles in all)
_DEFAULT = kernel.Tiles()
GMM_CANDIDATES = tuple(dict.fromkeys((
    (_DEFAULT.block_m, _DEFAULT.block_n, _DEFAULT.block_k, _DEFAULT.max_concurrent_steps),
    (128, 128, 64, 7),  # 224 KiB of pipeline SMEM, 128 accumulator registers: the deepest pipeline that fits
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


def _wgrad_reference(x, dy, gs, experts: int = 3) -> jax.Array:
  """x[rows of e].T @ dy[rows of e] in f32 for the first `experts` groups -> [experts, D, F]."""
  starts = [0] + [int(v) for v in jnp.cumsum(gs[:experts])]
  return jnp.stack([x[s:e].astype(jnp.float32).T @ dy[s:e].astype(jnp.float32)
                    for s, e in zip(starts[:-1], starts[1:])])


def _sweep_candidate(base: dict, make, args, w_axis, width: int, check, flops: float, cand) -> dict:
  """One tile candidate: its row, with `error` instead of a time where it fails to lower, compile or run. Where
  block_n does not divide the output width, w is padded once here (`n_pad`), not in every timed call."""
  bm, bn, bk, steps = cand
  row = dict(base, block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps, n_pad=width + -width % bn)
  try:
    call_args = args
    if w_axis is not None and width % bn:
      call_args = (args[0], kernel._pad_axis(args[1], w_axis, bn), args[2])
    compiled = jax.jit(make(_tiles(base["pass_"], cand))).lower(*call_args).compile()
    out = jax.block_until_ready(compiled(*call_args))
    seconds = timing.time_fn(compiled, *call_args, warmup=TILE_WARMUP, iters=TILE_ITERS)
    row.update(ms=seconds * 1e3, tflops=timing.tflops(flops, seconds), rel_err=check(out))
  except Exception as e:  # noqa: BLE001  a config that does not lower / compile / run must not stop the sweep
    print(f"[moe_gmm_tiles] {base['case']} {base['op']} {base['pass_']} {cand} failed: {str(e)[:2000]}", flush=True)
    lines = [line for line in str(e).splitlines() if line.strip()]
    row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]
  return row


def _sweep(rows: list[dict], case: str, name: str, d: int, f: int, gs: jax.Array) -> None:
  x, w, dy = _inputs(d, f, gs)
  m, experts = x.shape[0], gs.shape[0]
  flops = 2.0 * m * d * f
  want_fwd, n = _reference_rows(x, w, gs)
  want_dgrad, _ = _reference_rows(dy, jnp.swapaxes(w[:3], 1, 2), gs)
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
  for pass_, make, args, w_axis, width, check in passes:
    for i, cand in enumerate(TGMM_CANDIDATES if pass_ == "wgrad" else GMM_CANDIDATES):
      row = _sweep_candidate(dict(base, pass_=pass_), make, args, w_axis, width, check, flops, cand)
      if i == 0:
        default_ms = row.get("ms")
      if default_ms is not None and "ms" in row:
        row["vs_default"] = default_ms / row["ms"]
      timing.emit(rows, row)


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


def run_tiles(cfg: dict) -> list[dict]:
  """Section "moe_gmm_tiles"."""
  del cfg  # the expert shapes and loads, not the sequence length, set the GEMM sizes
  rows = []
  for case, tokens, local in CASES:
    if case in TILE_CASES:
      gs = _group_sizes(0, tokens, local)
      for name, d, f in PROJECTIONS:
        _sweep(rows, case, name, d, f, gs)
  _summary(rows)
  return rows


SECTIONS = {"moe_gmm": run, "moe_gmm_tiles": run_tiles}
