"""Benchmark section: sparse MLA attention at V3.2 shapes (issue 4 targets).

Per sequence length T (batch 1, 128 heads, keys 576 = 512 latent + 64 rope, top-k 2048): a tile of the
last 4096 queries against S = T latent rows with random selected indices (5% invalid), drawn in random order
(the `indices="sorted"` rows: the same entries ascending, as the model's `topk_indices` returns them). Rows:
- forward: Mosaic GPU kernel vs the XLA gather+einsum reference, TFLOP/s on the useful FLOPs
  2 * Tq * K * N * (576 + 512), and the error of out / lse against the reference on the GPU;
- fwd+bwd: grad of sum(out) through the Pallas path vs through XLA's autodiff of the reference (3.5x the
  forward FLOPs);
- bwd alone (dq, dkv from saved out / lse and random cotangents dO, dlse): the Mosaic GPU kernel
  (`kernel_bwd`), the chunked XLA recompute (`chunked_bwd`, the deterministic path) and XLA's autodiff of
  the reference (its vjp closure, forward residuals precomputed). Useful FLOPs counted as 2.5x the
  forward's (the backward's five products per head and key, 576 + 512 + 576 + 576 + 512 = 2752 = 2.53 x
  1088 multiply-adds). Errors: max |got - want| / max |want| of dq and dkv against the float32
  reference's vjp on the first `ERR_QUERIES` queries (every implementation rerun on that subset).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.sparse_mla import api, chunked_bwd, kernel_bwd, reference

HEADS, LATENT, ROPE, TOPK, QUERIES = 128, 512, 64, 2048, 4096
SCALE = 0.1352338
ERR_QUERIES = 256


def inputs(T: int, heads: int, seed: int = 0):  # noqa: N803
  """q [1, Tq, heads, 576], kv [1, T, 576] and indices [1, Tq, TOPK]: uniform over the T keys, 5% -1, in the
  order drawn (`sorted_indices` gives the order of `topk_indices`)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  tq = min(T, QUERIES)
  q = jax.random.normal(ks[0], (1, tq, heads, LATENT + ROPE), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, T, LATENT + ROPE), jnp.bfloat16)
  idx = jax.random.randint(ks[2], (1, tq, TOPK), 0, T)
  idx = jnp.where(jax.random.uniform(ks[3], idx.shape) < 0.05, -1, idx)
  return q, kv, idx


def sorted_indices(idx: jax.Array) -> jax.Array:
  """The same entries per query, ascending with the -1 entries last (as `topk_indices` returns them)."""
  big = jnp.iinfo(idx.dtype).max
  idx = jnp.sort(jnp.where(idx < 0, big, idx), axis=-1)
  return jnp.where(idx == big, -1, idx)


def rel_err(got, want):
  finite = jnp.isfinite(want)
  got, want = (jnp.where(finite, x.astype(jnp.float32), 0.0) for x in (got, want))
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@functools.cache
def _bwd_fns():
  """name -> jitted (q, kv, idx, out, lse, do, dlse) -> (dq, dkv), made once so that every caller shares the
  compiled functions. The indices are an argument, never a closure constant: XLA constant-folds the gather of a
  constant [Tq, K] index array for minutes."""
  ref = lambda q, kv, idx: reference.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT)
  autodiff_vjp = jax.jit(lambda q, kv, idx: jax.vjp(lambda q, kv: ref(q, kv, idx), q, kv)[1])
  apply_vjp = jax.jit(lambda vjp, do, dlse: vjp((do, dlse)))
  kernels = dict(
      pallas=jax.jit(lambda q, kv, idx, out, lse, do, dlse: kernel_bwd.sparse_mla_bwd(
          q, kv, idx, out, lse, do, dlse, scale=SCALE, v_dim=LATENT)),
      chunked=jax.jit(lambda q, kv, idx, out, lse, do, dlse: chunked_bwd.sparse_mla_bwd(
          q, kv, idx, out, lse, do, dlse, scale=SCALE, v_dim=LATENT, deterministic=True)))
  return kernels, autodiff_vjp, apply_vjp


def _bwd_rows(q, kv, idx, out, lse, base: dict, flops: float) -> list[dict]:
  ks = jax.random.split(jax.random.key(7))
  do = jax.random.normal(ks[0], out.shape, out.dtype)
  dlse = jax.random.normal(ks[1], lse.shape, jnp.float32) * 0.1
  kernels, autodiff_vjp, apply_vjp = _bwd_fns()
  rows = []
  for impl, fn in kernels.items():
    seconds = timing.time_fn(fn, q, kv, idx, out, lse, do, dlse, iters=3)
    rows.append(dict(base, op="bwd", impl=impl, ms=seconds * 1e3, tflops=timing.tflops(2.5 * flops, seconds)))
  vjp = autodiff_vjp(q, kv, idx)
  seconds = timing.time_fn(apply_vjp, vjp, do, dlse, iters=3)
  rows.append(dict(base, op="bwd", impl="xla_autodiff", ms=seconds * 1e3, tflops=timing.tflops(2.5 * flops, seconds)))
  del vjp

  # Errors on the first ERR_QUERIES queries against the float32 reference.
  sub = lambda x: x[:, :ERR_QUERIES]
  q, idx, out, lse, do, dlse = map(sub, (q, idx, out, lse, do, dlse))
  f32 = lambda x: x.astype(jnp.float32)
  want = apply_vjp(autodiff_vjp(f32(q), f32(kv), idx), f32(do), dlse)
  got = {impl: fn(q, kv, idx, out, lse, do, dlse) for impl, fn in kernels.items()}
  got["xla_autodiff"] = apply_vjp(autodiff_vjp(q, kv, idx), do, dlse)
  for row in rows:
    dq, dkv = got[row["impl"]]
    row.update(err_queries=ERR_QUERIES, dq_rel_err=rel_err(dq, want[0]), dkv_rel_err=rel_err(dkv, want[1]))
  return rows


def _rows_for(T: int, heads: int) -> list[dict]:  # noqa: N803
  q, kv, idx = inputs(T, heads)
  tq = q.shape[1]
  fwd = {impl: jax.jit(lambda q, kv, idx, impl=impl: api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT,
                                                                     implementation=impl))
         for impl in ("pallas", "xla")}

  def grad_fn(impl):  # idx an argument: see `_bwd_fns`
    loss = lambda q, kv, idx: jnp.sum(api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT,
                                                     implementation=impl)[0].astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  (out, lse), (want_out, want_lse) = fwd["pallas"](q, kv, idx), fwd["xla"](q, kv, idx)
  flops = 2.0 * tq * TOPK * heads * (LATENT + ROPE + LATENT)
  base = dict(section="sparse_mla", T=T, queries=tq, heads=heads, k=TOPK, indices="random")
  rows = []
  for impl in ("pallas", "xla"):
    seconds = timing.time_fn(fwd[impl], q, kv, idx)
    rows.append(dict(base, op="fwd", impl=impl, ms=seconds * 1e3, tflops=timing.tflops(flops, seconds)))
  rows[0].update(out_rel_err=rel_err(out, want_out), lse_rel_err=rel_err(lse, want_lse))
  grads = {}
  for impl in ("pallas", "xla"):
    grad = grad_fn(impl)
    grads[impl] = grad(q, kv, idx)
    seconds = timing.time_fn(grad, q, kv, idx, iters=3)
    rows.append(dict(base, op="fwd+bwd", impl=impl, ms=seconds * 1e3, tflops=timing.tflops(3.5 * flops, seconds)))
  rows[2].update(dq_rel_err=rel_err(grads["pallas"][0], grads["xla"][0]),
                 dkv_rel_err=rel_err(grads["pallas"][1], grads["xla"][1]))
  del grads
  rows += _bwd_rows(q, kv, idx, out, lse, base, flops)
  return rows + _sorted_rows(q, kv, sorted_indices(idx), fwd["pallas"], want_out,
                             dict(base, impl="pallas", indices="sorted"), flops)


def _sorted_rows(q, kv, idx, fwd, want_out, base: dict, flops: float) -> list[dict]:
  """The Pallas forward and backward on the same entries sorted ascending (`idx`), as the model's `topk_indices`
  returns them (the rows above take them in random order): time and the forward's error against the reference's
  output (the same entries give the same output)."""
  out, lse = fwd(q, kv, idx)
  rows = [dict(base, op="fwd", ms=timing.time_fn(fwd, q, kv, idx) * 1e3, out_rel_err=rel_err(out, want_out))]
  ks = jax.random.split(jax.random.key(7))
  do = jax.random.normal(ks[0], out.shape, out.dtype)
  dlse = jax.random.normal(ks[1], lse.shape, jnp.float32) * 0.1
  seconds = timing.time_fn(_bwd_fns()[0]["pallas"], q, kv, idx, out, lse, do, dlse, iters=3)
  rows.append(dict(base, op="bwd", ms=seconds * 1e3))
  rows[0]["tflops"] = timing.tflops(flops, rows[0]["ms"] / 1e3)
  rows[1]["tflops"] = timing.tflops(2.5 * flops, seconds)
  return rows


def run(cfg: dict) -> list[dict]:
  rows = [dict(section="sparse_mla", op="xla_bf16_matmul_8192", tflops=baselines.matmul_tflops())]
  for T in cfg["seq_lens"]:  # noqa: N806
    rows += _rows_for(T, HEADS)
  rows += _rows_for(cfg["seq_lens"][0], 64)  # a smaller head count (one 64-head tile per token)
  return rows
