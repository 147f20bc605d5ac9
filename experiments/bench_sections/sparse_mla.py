"""Benchmark section: sparse MLA attention at V3.2 shapes (issue 4 targets).

Per sequence length T (batch 1, 128 heads, keys 576 = 512 latent + 64 rope, top-k 2048): a tile of the
last 4096 queries against S = T latent rows with random selected indices (5% invalid). Rows:
- forward: Mosaic GPU kernel vs the XLA gather+einsum reference, TFLOP/s on the useful FLOPs
  2 * Tq * K * N * (576 + 512), and the error of out / lse against the reference on the GPU;
- backward (dq, dkv): the Pallas path's backward (chunked XLA recompute from lse) vs XLA's autodiff of the
  reference, counted as 2.5x the forward FLOPs.
"""

import jax
import jax.numpy as jnp

from experiments.bench_sections import baselines, timing
from pallas_kernels.sparse_mla import api

HEADS, LATENT, ROPE, TOPK, QUERIES = 128, 512, 64, 2048, 4096
SCALE = 0.1352338


def _inputs(T: int, heads: int, seed: int = 0):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 4)
  tq = min(T, QUERIES)
  q = jax.random.normal(ks[0], (1, tq, heads, LATENT + ROPE), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, T, LATENT + ROPE), jnp.bfloat16)
  idx = jax.random.randint(ks[2], (1, tq, TOPK), 0, T)
  idx = jnp.where(jax.random.uniform(ks[3], idx.shape) < 0.05, -1, idx)
  return q, kv, idx


def _rel_err(got, want):
  finite = jnp.isfinite(want)
  got, want = (jnp.where(finite, x.astype(jnp.float32), 0.0) for x in (got, want))
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _rows_for(T: int, heads: int) -> list[dict]:  # noqa: N803
  q, kv, idx = _inputs(T, heads)
  tq = q.shape[1]
  fwd = {impl: jax.jit(lambda q, kv, idx, impl=impl: api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT,
                                                                     implementation=impl))
         for impl in ("pallas", "xla")}

  def grad_fn(impl):
    loss = lambda q, kv: jnp.sum(api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT,
                                                implementation=impl)[0].astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  (out, lse), (want_out, want_lse) = fwd["pallas"](q, kv, idx), fwd["xla"](q, kv, idx)
  flops = 2.0 * tq * TOPK * heads * (LATENT + ROPE + LATENT)
  base = dict(section="sparse_mla", T=T, queries=tq, heads=heads, k=TOPK)
  rows = []
  for impl in ("pallas", "xla"):
    seconds = timing.time_fn(fwd[impl], q, kv, idx)
    rows.append(dict(base, op="fwd", impl=impl, ms=seconds * 1e3, tflops=timing.tflops(flops, seconds)))
  rows[0].update(out_rel_err=_rel_err(out, want_out), lse_rel_err=_rel_err(lse, want_lse))
  grads = {}
  for impl in ("pallas", "xla"):
    grads[impl] = grad_fn(impl)(q, kv)
    seconds = timing.time_fn(grad_fn(impl), q, kv, iters=3)
    rows.append(dict(base, op="fwd+bwd", impl=impl, ms=seconds * 1e3, tflops=timing.tflops(3.5 * flops, seconds)))
  rows[2].update(dq_rel_err=_rel_err(grads["pallas"][0], grads["xla"][0]),
                 dkv_rel_err=_rel_err(grads["pallas"][1], grads["xla"][1]))
  return rows


def run(cfg: dict) -> list[dict]:
  rows = [dict(section="sparse_mla", op="xla_bf16_matmul_8192", tflops=baselines.matmul_tflops())]
  for T in cfg["seq_lens"]:  # noqa: N806
    rows += _rows_for(T, HEADS)
  rows += _rows_for(cfg["seq_lens"][0], 64)  # a smaller head count (one 64-head tile per token)
  return rows
