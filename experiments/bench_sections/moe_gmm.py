"""Benchmark section: grouped matmul of the routed experts at DeepSeek shapes (issue 4 targets).

Up 7168 -> 2048 and down 2048 -> 7168, 8 active of 256 experts (random routing), for three loads (CASES):
- "256x4096": all 256 experts on one device, 4096 tokens: 128 rows per expert on average;
- "256x16384": the same with 16384 tokens: 512 rows per expert;
- "ep8_local32": one device of 8-way expert parallelism, its 32 local experts receiving the routed rows of
  8 x 4096 tokens: 1024 rows per expert, the load of real expert-parallel training.
`kernel.gmm` / `kernel.tgmm` with their default choices (forward and dgrad: ours from
`kernel.SCHEDULED_MIN_GROUPS` experts, else jax's bundled ragged_dot; wgrad: jax's transposed_ragged_dot) in
TF/s of useful FLOPs 2 * M * D * F, the forward's error against a dense f32 product on the first experts' rows,
and (first case only)
`lax.ragged_dot`, which falls back to a dense computation and fits in memory only for 1/8 of the rows.
Forward and dgrad also run with the forward kernel that `kernel.resolve_gmm_kernel` does not choose for the
case's expert count (rows `impl="pallas_<name>"`: "bundled" = jax's ragged_dot, "scheduled" = ours).
Both run about cdiv(M, block_m) + G row blocks (a block shared by two groups is computed for each), so with
128-row blocks and 128 rows per expert about half of the work is masked: the token count per expert, not only
the shapes, sets the TF/s.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from pallas_kernels.moe_gmm import api, kernel

ACTIVE, EXPERTS, HIDDEN, EXPERT_HIDDEN = 8, 256, 7168, 2048
CASES = (("256x4096", 4096, EXPERTS), ("256x16384", 16384, EXPERTS), ("ep8_local32", 8 * 4096, EXPERTS // 8))


def _group_sizes(seed: int, tokens: int, local_experts: int) -> jax.Array:
  """Rows per expert of the first `local_experts` experts when `tokens` tokens pick ACTIVE of EXPERTS."""
  scores = jax.random.uniform(jax.random.key(seed), (tokens, EXPERTS))
  experts = jax.lax.top_k(scores, ACTIVE)[1].reshape(-1)
  return jnp.bincount(experts, length=EXPERTS)[:local_experts].astype(jnp.int32)


def _reference_rows(x, w, gs, experts: int = 3) -> tuple[jax.Array, int]:
  """Rows of the first `experts` groups through a dense f32 matmul per expert (`lax.ragged_dot` itself
  runs out of memory at this size on the GPU: it falls back to a dense [M, E, F]-sized computation)."""
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(gs)])
  sizes, offsets = [int(v) for v in gs[:experts]], [int(v) for v in starts[:experts]]
  out = [x[o:o + n].astype(jnp.float32) @ w[e].astype(jnp.float32) for e, (o, n) in enumerate(zip(offsets, sizes))]
  return jnp.concatenate(out), sum(sizes)


def _rows_for(case: str, name: str, d: int, f: int, gs: jax.Array, with_xla: bool) -> list[dict]:
  m, experts = int(gs.sum()), gs.shape[0]
  kx, kw, ky = jax.random.split(jax.random.key(d), 3)
  x = jax.random.normal(kx, (m, d), jnp.bfloat16)
  w = jax.random.normal(kw, (experts, d, f), jnp.bfloat16) * d**-0.5
  dy = jax.random.normal(ky, (m, f), jnp.bfloat16)
  flops = 2.0 * m * d * f
  base = dict(section="moe_gmm", case=case, op=name, m=m, d=d, f=f, experts=experts, rows_per_expert=m // experts)
  pallas = jax.jit(lambda x, w, gs: api.grouped_matmul(x, w, gs, implementation="pallas"))
  seconds = timing.time_fn(pallas, x, w, gs)
  want, n = _reference_rows(x, w, gs)
  got = pallas(x, w, gs)[:n].astype(jnp.float32)
  rows = [dict(base, pass_="fwd", impl="pallas", ms=seconds * 1e3, tflops=timing.tflops(flops, seconds),
               rel_err=float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))]
  for pass_, fn in (("dgrad", lambda dy, w, gs: kernel.gmm(dy, w, gs, transpose_w=True)),
                    ("wgrad", lambda x, dy, gs: kernel.tgmm(x, dy, gs))):
    args = (dy, w, gs) if pass_ == "dgrad" else (x, dy, gs)
    seconds = timing.time_fn(jax.jit(fn), *args)
    rows.append(dict(base, pass_=pass_, impl="pallas", ms=seconds * 1e3, tflops=timing.tflops(flops, seconds)))
  rows += _scheduled_rows(base, flops, x, w, dy, gs)
  if m // experts <= SMALL_GROUP_ROWS:
    rows += _scheduled_rows(base, flops, x, w, dy, gs, SMALL_GROUP_TILES)
  if not with_xla:
    return rows
  # lax.ragged_dot on 1/8 of the rows (all it fits in memory), same experts and weights.
  small = m // 8
  small_gs = jnp.bincount(jnp.repeat(jnp.arange(experts), gs, total_repeat_length=m)[::8], length=experts)
  xla = jax.jit(lambda x, w, gs: api.grouped_matmul(x, w, gs, implementation="xla"))
  seconds = timing.time_fn(xla, x[:small], w, small_gs.astype(jnp.int32))
  rows.append(dict(base, m=small, pass_="fwd", impl="lax.ragged_dot", ms=seconds * 1e3,
                   tflops=timing.tflops(flops / 8, seconds)))
  return rows


# Tiles timed for our kernel where experts get few rows (not measured yet): 64-row blocks waste fewer rows in blocks
# two experts share, 256 columns keep the accumulator (and the work per loaded row block) of 128 x 128.
SMALL_GROUP_ROWS = 256
SMALL_GROUP_TILES = dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4)


def _scheduled_rows(base: dict, flops: float, x, w, dy, gs, tile_sizes: dict | None = None) -> list[dict]:
  """Forward and dgrad with the kernel that `kernel.resolve_gmm_kernel` does not pick for these groups (or, with
  tile_sizes, our kernel with those tiles), each checked on the first experts' rows against a dense f32 product
  (impl "pallas_<kernel>" or "pallas_scheduled_<block_m>x<block_n>")."""
  chosen = kernel.resolve_gmm_kernel(kernel.Tiles().gmm_kernel, gs.shape[0])
  other = "scheduled" if tile_sizes or chosen == "bundled" else "bundled"
  tiles = dataclasses.replace(kernel.Tiles(), gmm_kernel=other, **(tile_sizes or {}))
  name = f"scheduled_{tiles.block_m}x{tiles.block_n}" if tile_sizes else other
  rows = []
  for pass_, fn, args, w_ref in (
      ("fwd", lambda x, w, gs: kernel.gmm(x, w, gs, tiles=tiles), (x, w, gs), w),
      ("dgrad", lambda dy, w, gs: kernel.gmm(dy, w, gs, transpose_w=True, tiles=tiles), (dy, w, gs),
       jnp.swapaxes(w[:3], 1, 2))):
    f = jax.jit(fn)
    seconds = timing.time_fn(f, *args)
    want, n = _reference_rows(args[0], w_ref, gs)
    got = f(*args)[:n].astype(jnp.float32)
    rows.append(dict(base, pass_=pass_, impl=f"pallas_{name}", ms=seconds * 1e3,
                     tflops=timing.tflops(flops, seconds),
                     rel_err=float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))))
  return rows


def run(cfg: dict) -> list[dict]:
  del cfg  # the expert shapes and loads (CASES), not the sequence length, set the GEMM sizes
  rows = []
  for i, (case, tokens, local) in enumerate(CASES):
    gs = _group_sizes(0, tokens, local)
    for name, d, f in (("up", HIDDEN, EXPERT_HIDDEN), ("down", EXPERT_HIDDEN, HIDDEN)):
      rows += _rows_for(case, name, d, f, gs, with_xla=i == 0)
      print(*rows[-7:], sep="\n", flush=True)
  return rows
