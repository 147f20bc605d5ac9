"""Benchmark section: the whole DSA attention core of one V3.2 layer vs dense cuDNN (issue 4 target).

Per T (batch 1, causal): indexer scores + top-k (64 x 128, k = 2048) + sparse MLA over the selected
576-dim entries (128 heads) — with our kernels (`implementation=None`, i.e. Pallas on the GPU; top-k by
the pruned select whose threshold kernel also compacts, the default, and with sorts; speedups use the faster) and with the
plain-XLA path (reference scores, lax.top_k, gather attention; query chunks of 512 so it fits) — against
cuDNN dense causal MLA attention (128 heads, q/k 192, v 128). Projections are excluded from all three.
A fourth row runs ours with the FP8 indexer of the official V3.2 numerics (`index_topk(fp8=True)`; its
selection differs from the bf16 one by FP8 rounding, so its error is reported on its own). Also timed: ours
with other counts of index_topk's causal key-prefix stages (`STAGE_VARIANTS`), and the sparse MLA part alone.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.sparse_mla import api as sparse_mla_api

I, H, K, N, C, R = 64, 128, 2048, 128, 512, 64
XLA_CHUNK = 512  # the reference indexer materialises [chunk, I, S] float32 logits (17 GB at 128K)


def inputs(T: int):  # noqa: N803
  ks = jax.random.split(jax.random.key(0), 5)
  normal = lambda k, shape, dt=jnp.bfloat16: jax.random.normal(k, shape, dt)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  vis = dict(q_positions=pos, kv_positions=pos, q_segment_ids=jnp.zeros_like(pos), kv_segment_ids=jnp.zeros_like(pos))
  return dict(iq=normal(ks[0], (1, T, I, H)), ik=normal(ks[1], (1, T, H)),
              iw=normal(ks[2], (1, T, I), jnp.float32) * (I * H) ** -0.5,
              q=normal(ks[3], (1, T, N, C + R)) * 0.05, kv=normal(ks[4], (1, T, C + R))), vis


def layer(x, vis, implementation, select="xla", fp8=False, causal_stages=indexer_api.CAUSAL_STAGES):
  idx = indexer_api.index_topk(x["iq"], x["ik"], x["iw"], topk=K, **vis, implementation=implementation,
                               select_implementation=select, fp8=fp8, causal_stages=causal_stages)
  return attention(x, idx, implementation)


def attention(x, idx, implementation):
  """The sparse MLA part of the layer over given top-k indices."""
  return sparse_mla_api.sparse_mla(x["q"], x["kv"], idx, scale=(C + R) ** -0.5, v_dim=C,
                                   implementation=implementation)[0]


# index_topk's causal key-prefix stage counts timed beside its default (rows `dsa_kernels_stages{n}_s`).
STAGE_VARIANTS = (8, 16)


def _xla_layer(x, vis):
  """Plain XLA, query chunk by chunk (the whole [T, K, 576] gather does not fit at 128K)."""
  T = x["q"].shape[1]  # noqa: N806
  n = T // XLA_CHUNK if T > XLA_CHUNK else 1
  split = lambda a: jnp.moveaxis(a.reshape(1, n, T // n, *a.shape[2:]), 1, 0)

  def chunk(args):
    iq, iw, q, qp, qs = args
    cvis = dict(vis, q_positions=qp, q_segment_ids=qs)
    return layer(dict(x, iq=iq, iw=iw, q=q), cvis, "xla")

  out = jax.lax.map(chunk, (split(x["iq"]), split(x["iw"]), split(x["q"]), split(vis["q_positions"]),
                            split(vis["q_segment_ids"])))
  return jnp.moveaxis(out, 0, 1).reshape(1, T, N, C)


def run(cfg: dict) -> list[dict]:
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    x, vis = inputs(T)
    ours = jax.jit(lambda x, vis: layer(x, vis, None, "pruned_fused_select"))
    pruned = jax.jit(lambda x, vis: layer(x, vis, None, "pruned"))
    xla = jax.jit(_xla_layer)
    fp8 = jax.jit(lambda x, vis: layer(x, vis, None, "pruned_fused_select", fp8=True))
    progress = lambda name, seconds: print(f"dsa_layer T={T}: {name} {seconds:.4f} s", flush=True) or seconds
    ours_s = progress("ours", timing.time_fn(ours, x, vis, warmup=1, iters=3))
    fp8_s = progress("ours, FP8 indexer", timing.time_fn(fp8, x, vis, warmup=1, iters=3))
    pruned_s = progress("ours, sorting select", timing.time_fn(pruned, x, vis, warmup=1, iters=3))
    xla_s = progress("plain XLA", timing.time_fn(xla, x, vis, warmup=1, iters=2))
    dense_s = progress("cuDNN dense", baselines.cudnn_dense_mla_layer_seconds(T))
    last = slice(T - 256, T)  # check the last rows, where DSA is really sparse
    got, want = ours(x, vis)[:, last].astype(jnp.float32), xla(x, vis)[:, last].astype(jnp.float32)
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    got_fp8 = fp8(x, vis)[:, last].astype(jnp.float32)
    err_fp8 = float(jnp.abs(got_fp8 - want).max() / jnp.abs(want).max())
    stages = {}
    for n in STAGE_VARIANTS:
      variant = jax.jit(lambda x, vis, n=n: layer(x, vis, None, "pruned_fused_select", causal_stages=n))
      stages[f"dsa_kernels_stages{n}_s"] = progress(f"ours, {n} causal stages",
                                                    timing.time_fn(variant, x, vis, warmup=1, iters=3))
      stages[f"stages{n}_speedup_vs_dense"] = dense_s / stages[f"dsa_kernels_stages{n}_s"]
    # The same indices over all keys in one stage: one more compile of a single scores kernel, not of 32.
    idx = jax.jit(lambda x, vis: indexer_api.index_topk(x["iq"], x["ik"], x["iw"], topk=K, **vis,
                                                        causal_prefix=False))(x, vis)
    stages["sparse_mla_part_s"] = progress("the sparse MLA part", timing.time_fn(
        jax.jit(lambda x, idx: attention(x, idx, None)), x, idx, warmup=1, iters=3))
    row = dict(section="dsa_layer", T=T, dsa_kernels_s=ours_s, dsa_kernels_pruned_sort_topk_s=pruned_s, dsa_xla_s=xla_s,
               cudnn_dense_s=dense_s, speedup_vs_dense=dense_s / min(ours_s, pruned_s),
               speedup_vs_xla=xla_s / min(ours_s, pruned_s), rel_err_last256=err, dsa_kernels_fp8_indexer_s=fp8_s,
               fp8_indexer_speedup_vs_dense=dense_s / fp8_s, fp8_indexer_rel_err_last256=err_fp8, **stages)
    print(row, flush=True)
    rows.append(row)
  return rows
