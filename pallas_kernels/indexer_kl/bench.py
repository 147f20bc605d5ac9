"""Benchmark sections "indexer_kl" (dense warm-up) and "indexer_kl_sparse" (sparse stage) at V3.2 shapes (GPU;
benchmarks/indexer_kl.md).

  python -m experiments.bench_kernels --sections=indexer_kl,indexer_kl_sparse --seq_lens=8192,32768

Per sequence length T (batch 1, one causal document, 128 heads x 576-dim latent keys, 64 index heads x 128), one
row per (pass, implementation), "pallas" (Mosaic GPU kernels) and "xla" (`chunked.py`), in ms:
- "indexer_kl": `api.dense_kl` forward and forward + backward (gradients of the summed KL w.r.t. the indexer's
  q, k, w; "pallas" with the backward kernel), and the backward alone from the forward's saved statistics:
  `kernel_dense_bwd` against `chunked.dense_kl_grads` (the `deterministic=True` backward). The forward in TFLOP/s
  of useful causal work 2 (N C + I H) T (T + 1) / 2, the backward alone of 2 (N C + 3 I H) T (T + 1) / 2.
  The "xla" forward visits every (query, key) pair, so it runs only up to XLA_MAX_SEQ_LEN.
- "indexer_kl_sparse": the last QUERIES queries against S = T keys, each with K = 2048 distinct random causal
  indices in a random order, as top-k hands them over: `api.sparse_kl` forward and forward + backward, the
  forward also in TFLOP/s of useful work 2 Tq K (N C + I H); each implementation's gradient errors against the
  "xla" path on float32 copies of the inputs.
"pallas" rows carry rel_err: max |pallas - xla| / max |xla| over the pass's outputs. The attention lse is not
the exact one (that needs a dense attention pass): queries are scaled so that the logits are small and
lse[t, h] = log(t + 1), which keeps p near uniform and finite; the KL normalises p by its sum anyway.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from pallas_kernels.indexer_kl import api, chunked, kernel_dense, kernel_dense_bwd

HEADS, KEY_DIM, INDEX_HEADS, INDEX_DIM = 128, 576, 64, 128
SCALE = 0.1352338  # V3.2 softmax scale (YaRN-adjusted 192^-0.5)
XLA_MAX_SEQ_LEN = 32768
QUERIES, TOPK = 4096, 2048
IMPLEMENTATIONS = ("pallas", "xla")
# Device bytes per token of the dense rows: bf16 attention query and key, lse, bf16 index query and key, w, and
# the index gradients (float32 accumulators).
_DENSE_BYTES_PER_TOKEN = 2 * HEADS * KEY_DIM + 2 * KEY_DIM + 4 * HEADS + 2 * (2 + 4) * INDEX_DIM * (INDEX_HEADS + 1)


def _inputs(T: int, queries: int, seed: int = 0):  # noqa: N803
  """The last `queries` of T positions against T keys -> ((attn_q, attn_k, attn_lse), (idx_q, idx_k, idx_w), vis)."""
  ks = jax.random.split(jax.random.key(seed), 5)
  positions = jnp.arange(T, dtype=jnp.int32)[None]
  q_positions = positions[:, T - queries:]
  attn_q = jax.random.normal(ks[0], (1, queries, HEADS, KEY_DIM), jnp.bfloat16) * 0.1
  attn_k = jax.random.normal(ks[1], (1, T, KEY_DIM), jnp.bfloat16)
  attn_lse = jnp.broadcast_to(jnp.log1p(q_positions.astype(jnp.float32))[..., None], (1, queries, HEADS))
  idx = (jax.random.normal(ks[2], (1, queries, INDEX_HEADS, INDEX_DIM), jnp.bfloat16),
         jax.random.normal(ks[3], (1, T, INDEX_DIM), jnp.bfloat16),
         jax.random.normal(ks[4], (1, queries, INDEX_HEADS), jnp.float32) * (INDEX_HEADS * INDEX_DIM) ** -0.5)
  vis = dict(q_positions=q_positions, kv_positions=positions, q_segment_ids=jnp.zeros_like(q_positions),
             kv_segment_ids=jnp.zeros_like(positions))
  return (attn_q, attn_k, attn_lse), idx, vis


def causal_indices(key: jax.Array, q_positions: jax.Array, k: int) -> jax.Array:
  """int32 [Tq, k]: per query at position p, k distinct keys in [0, p] (all p + 1 and -1 slots if p < k).

  Slot j draws from its own stratum [floor(j w), floor(j w) + floor(w)) with w = (p + 1) / k, so the keys are
  distinct without a per-row sort over p; then the slots are shuffled per row."""
  ks = jax.random.split(key)
  j = jnp.arange(k)
  width = (q_positions[:, None] + 1) / k
  offset = jax.random.randint(ks[0], (q_positions.shape[0], k), 0, jnp.iinfo(jnp.int32).max)
  strata = jnp.floor(j * width).astype(jnp.int32) + offset % jnp.maximum(jnp.floor(width), 1).astype(jnp.int32)
  idx = jnp.where(width >= 1, strata, jnp.where(j <= q_positions[:, None], j, -1))
  return jax.vmap(jax.random.permutation)(jax.random.split(ks[1], idx.shape[0]), idx).astype(jnp.int32)


def _rel_err(got, want) -> float:
  errs = jax.tree.map(lambda g, w: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                                         / jnp.max(jnp.abs(w.astype(jnp.float32)))), got, want)
  return max(jax.tree.leaves(errs))


def _measure(section: str, T: int, passes: dict, flops: dict, extra=None, **fields) -> list[dict]:  # noqa: N803
  """Times fn(*args) for passes[impl][pass_] = (fn, args), "xla" first -> rows, each printed as measured.

  "pallas" rows get rel_err against the "xla" output of the same pass where both ran; extra(impl, pass_,
  output) -> more fields of the row (or None).
  """
  repeats = dict(warmup=1, iters=3) if T > 32768 else {}
  rows, outputs = [], {}
  for impl in sorted(passes, key=lambda impl: impl != "xla"):
    for pass_, (fn, args) in passes[impl].items():
      seconds = timing.time_fn(fn, *args, **repeats)
      outputs[impl, pass_] = fn(*args)
      row = dict(section=section, T=T, pass_=pass_, impl=impl, ms=seconds * 1e3, **fields)
      if pass_ in flops:
        row["tflops"] = timing.tflops(flops[pass_], seconds)
      if impl == "pallas" and ("xla", pass_) in outputs:
        row["rel_err"] = _rel_err(outputs[impl, pass_], outputs["xla", pass_])
      row.update((extra and extra(impl, pass_, outputs[impl, pass_])) or {})
      timing.emit(rows, row)
  return rows


def _dense_passes(implementation: str, attn, idx, vis, saved) -> dict:
  """(jitted pass, its arguments) of `dense_kl` by pass: the KL [1, T] ("fwd"), the gradients of its sum
  ("fwd+bwd"), and the backward alone from the forward's saved statistics ("bwd")."""

  def kl(attn, idx, vis):
    return api.dense_kl(*attn, SCALE, *idx, **vis, implementation=implementation)

  grads = jax.grad(lambda idx, attn, vis: kl(attn, idx, vis).sum())
  backward = kernel_dense_bwd.dense_grads if implementation == "pallas" else chunked.dense_kl_grads
  return {"fwd": (jax.jit(kl), (attn, idx, vis)),
          "fwd+bwd": (jax.jit(lambda attn, idx, vis: grads(idx, attn, vis)), (attn, idx, vis)),
          "bwd": (jax.jit(lambda attn, idx, vis, saved: backward(*attn, SCALE, *idx, *saved, **vis)),
                  (attn, idx, vis, saved))}


def _saved_statistics(attn, idx, vis):
  """The forward's residuals (logsumexp(I), z) and a cotangent of ones, from the forward kernel."""
  m, l, z, _, _ = kernel_dense.combine(kernel_dense.dense_stats(*attn, SCALE, *idx, **vis))
  return m + jnp.log(l), z, jnp.ones_like(z)


def run_dense(cfg: dict) -> list[dict]:
  out = []
  for T in cfg["seq_lens"]:  # noqa: N806
    if not timing.fits(f"indexer_kl at T={T}", T * _DENSE_BYTES_PER_TOKEN * 1.5):
      continue
    attn, idx, vis = _inputs(T, T)
    saved = jax.jit(_saved_statistics)(attn, idx, vis)
    causal = T * (T + 1) / 2
    flops = {"fwd": 2.0 * (HEADS * KEY_DIM + INDEX_HEADS * INDEX_DIM) * causal,
             "bwd": 2.0 * (HEADS * KEY_DIM + 3 * INDEX_HEADS * INDEX_DIM) * causal}
    impls = IMPLEMENTATIONS if T <= XLA_MAX_SEQ_LEN else ("pallas",)
    out += _measure("indexer_kl", T, {impl: _dense_passes(impl, attn, idx, vis, saved) for impl in impls}, flops)
  return out


def _sparse_passes(implementation: str, args) -> dict:
  def kl(attn, idx, indices, vis):
    return api.sparse_kl(*attn, SCALE, *idx, indices, **vis, implementation=implementation)

  grads = jax.grad(lambda idx, attn, indices, vis: kl(attn, idx, indices, vis).sum())
  return {"fwd": (jax.jit(kl), args),
          "fwd+bwd": (jax.jit(lambda attn, idx, indices, vis: grads(idx, attn, indices, vis)), args)}


def run_sparse(cfg: dict) -> list[dict]:
  out = []
  for T in cfg["seq_lens"]:  # noqa: N806
    tq = min(T, QUERIES)
    attn, idx, vis = _inputs(T, tq)
    indices = causal_indices(jax.random.key(5), vis["q_positions"][0], TOPK)[None]
    flops = {"fwd": 2.0 * tq * TOPK * (HEADS * KEY_DIM + INDEX_HEADS * INDEX_DIM)}
    f32_idx = jax.tree.map(lambda x: x.astype(jnp.float32), idx)
    fn, _ = _sparse_passes("xla", None)["fwd+bwd"]
    exact = fn(attn, f32_idx, indices, vis)

    def grad_errors(impl, pass_, output):  # each implementation's gradients against the float32 computation
      del impl
      if pass_ == "fwd+bwd":
        return {f"{name}_err_vs_f32": _rel_err(got, want) for name, got, want in zip(("d_iq", "d_ik", "d_w"),
                                                                                      output, exact)}
      return None

    args = (attn, idx, indices, vis)
    out += _measure("indexer_kl_sparse", T, {impl: _sparse_passes(impl, args) for impl in IMPLEMENTATIONS}, flops,
                    grad_errors, queries=tq, k=TOPK)
  return out


SECTIONS = {"indexer_kl": run_dense, "indexer_kl_sparse": run_sparse}
