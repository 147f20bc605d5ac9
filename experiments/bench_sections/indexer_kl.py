"""Benchmark section: the dense indexer-warm-up KL at V3.2 shapes (issue 3, item 3).

Per sequence length T (batch 1, one causal document, 128 heads x 576-dim latent keys, 64 index heads x 128):
`indexer_kl.api.dense_kl` forward and forward + backward (gradients of the summed KL w.r.t. the indexer's
q, k, w), "pallas" (Mosaic GPU statistics and backward kernels) and "xla" (chunked XLA both ways), in ms;
and the backward alone from the forward's saved statistics: "pallas" (`kernel_dense_bwd`) against "xla"
(`dense_bwd`, the `deterministic=True` path of "pallas"). The forward in TFLOP/s of useful causal work
2 (N C + I H) T (T + 1) / 2, the backward alone of 2 (N C + 3 I H) T (T + 1) / 2 (attention logits
recomputed, index logits recomputed and pushed back to q and k); and the relative error of the Pallas
KL and gradients against the XLA path (max |difference| / max |xla|).

The "xla" forward computes every (query, key) pair (no causal skipping), so "xla" runs only up to
XLA_MAX_SEQ_LEN. The attention lse is not the exact one (that needs a dense attention pass): queries are
scaled so that the logits are small and lse[t, h] = log(t + 1), which keeps p near uniform and finite;
the KL normalises p by its sum anyway.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from pallas_kernels.indexer_kl import api, dense_bwd, kernel_dense, kernel_dense_bwd

HEADS, KEY_DIM, INDEX_HEADS, INDEX_DIM = 128, 576, 64, 128
SCALE = 0.1352338  # V3.2 softmax scale (YaRN-adjusted 192^-0.5)
XLA_MAX_SEQ_LEN = 32768


def _inputs(T: int, seed: int = 0):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 5)
  attn_q = jax.random.normal(ks[0], (1, T, HEADS, KEY_DIM), jnp.bfloat16) * 0.1
  attn_k = jax.random.normal(ks[1], (1, T, KEY_DIM), jnp.bfloat16)
  positions = jnp.arange(T, dtype=jnp.int32)[None]
  attn_lse = jnp.broadcast_to(jnp.log1p(positions.astype(jnp.float32))[..., None], (1, T, HEADS))
  idx = (jax.random.normal(ks[2], (1, T, INDEX_HEADS, INDEX_DIM), jnp.bfloat16),
         jax.random.normal(ks[3], (1, T, INDEX_DIM), jnp.bfloat16),
         jax.random.normal(ks[4], (1, T, INDEX_HEADS), jnp.float32) * (INDEX_HEADS * INDEX_DIM) ** -0.5)
  vis = dict(q_positions=positions, kv_positions=positions, q_segment_ids=jnp.zeros_like(positions),
             kv_segment_ids=jnp.zeros_like(positions))
  return (attn_q, attn_k, attn_lse), idx, vis


def functions(implementation: str):
  """(forward, forward + backward) of `dense_kl`, jitted: f(attn, idx, vis) -> KL [1, T] / grads of its sum."""

  def kl(attn, idx, vis):
    attn_q, attn_k, attn_lse = attn
    # "pallas" here takes the backward kernel (deterministic=False): the rows measure it against "xla".
    return api.dense_kl(attn_q, attn_k, attn_lse, SCALE, *idx, **vis, implementation=implementation,
                        deterministic=implementation == "xla")

  grads = jax.grad(lambda idx, attn, vis: kl(attn, idx, vis).sum())
  return jax.jit(kl), jax.jit(lambda attn, idx, vis: grads(idx, attn, vis))


def backward_functions():
  """(saved statistics, {impl: backward alone}), jitted: saved(attn, idx, vis) -> (lse_scores, z, g = 1);
  backward(attn, idx, vis, saved) -> gradients w.r.t. the indexer's q, k, w."""

  def saved(attn, idx, vis):
    attn_q, attn_k, attn_lse = attn
    m, l, z, _, _ = kernel_dense.combine(kernel_dense.dense_stats(attn_q, attn_k, attn_lse, SCALE, *idx, **vis))
    return m + jnp.log(l), z, jnp.ones_like(z)

  def backward(grads_fn):
    return jax.jit(lambda attn, idx, vis, saved: grads_fn(*attn, SCALE, *idx, *saved, **vis))

  return jax.jit(saved), {"pallas": backward(kernel_dense_bwd.dense_grads),
                          "xla": backward(dense_bwd.dense_kl_grads)}


def _rel_err(got, want) -> float:
  errs = jax.tree.map(lambda g, w: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                                         / jnp.max(jnp.abs(w.astype(jnp.float32)))), got, want)
  return max(jax.tree.leaves(errs))


def add_rel_errors(rows: list[dict], outputs: dict) -> None:
  """Gives each "pallas" row its rel_err against the "xla" row of the same pass (also the sparse section's):
  max |pallas - xla| / max |xla|, the largest over the output's arrays."""
  for row in rows:
    if row["impl"] == "pallas":
      row["rel_err"] = _rel_err(outputs["pallas", row["pass_"]], outputs["xla", row["pass_"]])


def _rows_for(T: int) -> list[dict]:  # noqa: N803
  attn, idx, vis = _inputs(T)
  useful_flops = 2.0 * (HEADS * KEY_DIM + INDEX_HEADS * INDEX_DIM) * T * (T + 1) / 2
  repeats = dict(warmup=1, iters=3) if T > 32768 else {}
  impls = ("pallas", "xla") if T <= XLA_MAX_SEQ_LEN else ("pallas",)
  rows, outputs = [], {}
  for impl in impls:
    for pass_, fn in zip(("fwd", "fwd+bwd"), functions(impl)):
      seconds = timing.time_fn(fn, attn, idx, vis, **repeats)
      outputs[impl, pass_] = fn(attn, idx, vis)
      row = dict(section="indexer_kl", T=T, pass_=pass_, impl=impl, ms=seconds * 1e3)
      if pass_ == "fwd":
        row["tflops"] = timing.tflops(useful_flops, seconds)
      rows.append(row)
  saved_fn, backward = backward_functions()
  saved = saved_fn(attn, idx, vis)
  bwd_flops = 2.0 * (HEADS * KEY_DIM + 3 * INDEX_HEADS * INDEX_DIM) * T * (T + 1) / 2
  for impl in impls:
    seconds = timing.time_fn(backward[impl], attn, idx, vis, saved, **repeats)
    outputs[impl, "bwd"] = backward[impl](attn, idx, vis, saved)
    rows.append(dict(section="indexer_kl", T=T, pass_="bwd", impl=impl, ms=seconds * 1e3,
                     tflops=timing.tflops(bwd_flops, seconds)))
  if "xla" in impls:
    add_rel_errors(rows, outputs)
  return rows


def run(cfg: dict) -> list[dict]:
  return [row for T in cfg["seq_lens"] for row in _rows_for(T)]
