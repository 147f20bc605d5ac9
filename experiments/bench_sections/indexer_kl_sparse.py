"""Benchmark section: the sparse-stage indexer KL at V3.2 shapes (issue 3, item 3).

Per sequence length T (batch 1, one causal document, 128 heads x 576-dim latent keys, 64 index heads x 128):
the last QUERIES queries against S = T keys, each with K = 2048 distinct random causal (valid) indices in a
random order, as top-k would hand them over. `indexer_kl.api.sparse_kl` forward and forward + backward
(gradients of the summed KL w.r.t. the indexer's q, k, w), "pallas" (Mosaic GPU kernels both ways) and
"xla" (chunked gather + einsum, differentiated by JAX), in ms. The "pallas" rows are there five times,
columns gather / gather_warps / reduce_warps: the default config (TMA row gathers from 4 warps, one thread
for the backward's d ik reduce-adds) through the API; then, through `sparse_pallas.sparse_kl` with a
`kernel_sparse.Config`: gather_warps = 1 (as at first), reduce_warps = 4, the cp.async gather, and the
cp.async gather with reduce_warps = 4, for the before / after of each in one run; the forward also in TFLOP/s
of useful work 2 Tq K (N C + I H); the relative error of the Pallas KL and gradients against the XLA path
(max |difference| / max |xla|); and, since the XLA path is not exact either, each implementation's error
in each gradient (d idx_q, d idx_k, d idx_w) against the XLA path on float32 copies of the same inputs.

As in the dense section, the attention lse is not the exact one: queries are scaled so that the logits
are small and lse[t, h] = log(t + 1); the KL normalises p by its sum over the selected keys anyway.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from experiments.bench_sections.indexer_kl import HEADS, INDEX_DIM, INDEX_HEADS, KEY_DIM, SCALE, add_rel_errors
from pallas_kernels.indexer_kl import api, kernel_sparse, sparse_pallas

QUERIES, TOPK = 4096, 2048
# (implementation, gather_warps): None = `api.sparse_kl`'s default config (which has 4 gather warps).
# (implementation, kernel_sparse.Config or None for the API's default)
VARIANTS = (("pallas", None), ("pallas", kernel_sparse.Config(gather_warps=1)),
            ("pallas", kernel_sparse.Config(reduce_warps=4)), ("pallas", kernel_sparse.Config(gather="cp_async")),
            ("pallas", kernel_sparse.Config(gather="cp_async", reduce_warps=4)), ("xla", None))
PASSES = ("fwd", "fwd+bwd")


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


def _inputs(T: int, seed: int = 0):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 6)
  tq = min(T, QUERIES)
  positions = jnp.arange(T, dtype=jnp.int32)[None]
  q_positions = positions[:, T - tq:]
  attn_q = jax.random.normal(ks[0], (1, tq, HEADS, KEY_DIM), jnp.bfloat16) * 0.1
  attn_k = jax.random.normal(ks[1], (1, T, KEY_DIM), jnp.bfloat16)
  attn_lse = jnp.broadcast_to(jnp.log1p(q_positions.astype(jnp.float32))[..., None], (1, tq, HEADS))
  idx = (jax.random.normal(ks[2], (1, tq, INDEX_HEADS, INDEX_DIM), jnp.bfloat16),
         jax.random.normal(ks[3], (1, T, INDEX_DIM), jnp.bfloat16),
         jax.random.normal(ks[4], (1, tq, INDEX_HEADS), jnp.float32) * (INDEX_HEADS * INDEX_DIM) ** -0.5)
  indices = causal_indices(ks[5], q_positions[0], TOPK)[None]
  vis = dict(q_positions=q_positions, kv_positions=positions, q_segment_ids=jnp.zeros_like(q_positions),
             kv_segment_ids=jnp.zeros_like(positions))
  return (attn_q, attn_k, attn_lse), idx, indices, vis


def functions(implementation: str, config: kernel_sparse.Config | None = None):
  """(forward, forward + backward) of `sparse_kl`, jitted: f(attn, idx, indices, vis) -> KL [1, Tq] / grads.

  With a config, the "pallas" kernels with that `kernel_sparse.Config` (the API takes no config)."""

  def kl(attn, idx, indices, vis):
    attn_q, attn_k, attn_lse = attn
    if config is None:
      return api.sparse_kl(attn_q, attn_k, attn_lse, SCALE, *idx, indices, **vis, implementation=implementation)
    assert implementation == "pallas", implementation
    return sparse_pallas.sparse_kl(attn_q, attn_k, attn_lse, SCALE, *idx, indices, **vis, config=config)

  grads = jax.grad(lambda idx, attn, indices, vis: kl(attn, idx, indices, vis).sum())
  return jax.jit(kl), jax.jit(lambda attn, idx, indices, vis: grads(idx, attn, indices, vis))


def _rows_for(T: int) -> list[dict]:  # noqa: N803
  args = _inputs(T)
  tq = args[0][0].shape[1]
  useful_flops = 2.0 * tq * TOPK * (HEADS * KEY_DIM + INDEX_HEADS * INDEX_DIM)
  rows, outputs = [], {}  # outputs by (impl, variant number, pass)
  for v, (impl, config) in enumerate(VARIANTS):
    for pass_, fn in zip(PASSES, functions(impl, config)):
      seconds = timing.time_fn(fn, *args, iters=3)
      row = dict(section="indexer_kl_sparse", T=T, queries=tq, k=TOPK, pass_=pass_, impl=impl, ms=seconds * 1e3)
      if impl == "pallas":
        used = config or kernel_sparse.Config()
        row.update(gather=used.gather, gather_warps=used.gather_warps, reduce_warps=used.reduce_warps)
      if pass_ == "fwd":
        row["tflops"] = timing.tflops(useful_flops, seconds)
      outputs[impl, v, pass_] = fn(*args)
      rows.append(dict(row, variant=v))
  xla_variant = next(v for v, (impl, _) in enumerate(VARIANTS) if impl == "xla")
  xla = {("xla", pass_): outputs["xla", xla_variant, pass_] for pass_ in PASSES}
  for v, (impl, _) in enumerate(VARIANTS):  # each Pallas variant against the "xla" rows
    if impl == "pallas":
      add_rel_errors([row for row in rows if row["variant"] == v],
                     {**xla, **{("pallas", pass_): outputs["pallas", v, pass_] for pass_ in PASSES}})
  attn, idx, indices, vis = args
  exact = functions("xla")[1](attn, jax.tree.map(lambda x: x.astype(jnp.float32), idx), indices, vis)
  for row in rows:
    if row["pass_"] == "fwd+bwd":
      got_grads = outputs[row["impl"], row["variant"], "fwd+bwd"]
      for name, got, want in zip(("d_iq", "d_ik", "d_w"), got_grads, exact):
        row[f"{name}_err_vs_f32"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
  for row in rows:
    del row["variant"]
  return rows


def run(cfg: dict) -> list[dict]:
  return [row for T in cfg["seq_lens"] for row in _rows_for(T)]
