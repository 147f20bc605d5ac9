"""Benchmark section "dsa_core": the DSA attention core of one V3.2 layer against dense cuDNN and plain XLA (GPU;
benchmarks/dsa_core.md).

  python -m experiments.bench_kernels --sections=dsa_core --seq_lens=131072

Per T (batch 1, one causal document): indexer scores + top-k (64 x 128, k = 2048) + sparse MLA over the selected
576-dim entries (128 heads), with our kernels (`implementation=None`: Pallas on the GPU, `index_topk` then
`sparse_mla`) and with the plain-XLA path (reference scores, `lax.top_k`, gather attention; query chunks of
XLA_CHUNK so it fits), against cuDNN dense causal MLA attention (128 heads, q/k 192, v 128). Projections are
excluded from all three. Also: ours with the FP8 indexer of the official V3.2 numerics (`index_topk(fp8=True)`;
its selection differs from the bf16 one by FP8 rounding, so its error is reported on its own), and the sparse MLA
part alone. Errors: max |ours - XLA| / max |XLA| on the last 256 rows, where DSA is really sparse.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.sparse_mla import api as sparse_mla_api

I, H, K, N, C, R = 64, 128, 2048, 128, 512, 64
XLA_CHUNK = 512  # the reference indexer materialises [chunk, I, S] float32 logits (17 GB at 128K)
# Device bytes per token of our layer: the indexer inputs, the MLA query, key and output, the indices and lse.
_BYTES_PER_TOKEN = I * H * 2 + H * 2 + I * 4 + N * (C + R) * 2 + (C + R) * 2 + N * C * 2 + N * 4 + K * 4


def inputs(T: int):  # noqa: N803
  """Random bf16 inputs of one layer's DSA core over one causal document of T tokens -> (x, visibility)."""
  ks = jax.random.split(jax.random.key(0), 5)
  normal = lambda k, shape, dt=jnp.bfloat16: jax.random.normal(k, shape, dt)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  vis = dict(q_positions=pos, kv_positions=pos, q_segment_ids=jnp.zeros_like(pos), kv_segment_ids=jnp.zeros_like(pos))
  return dict(iq=normal(ks[0], (1, T, I, H)), ik=normal(ks[1], (1, T, H)),
              iw=normal(ks[2], (1, T, I), jnp.float32) * (I * H) ** -0.5,
              q=normal(ks[3], (1, T, N, C + R)) * 0.05, kv=normal(ks[4], (1, T, C + R))), vis


def layer(x, vis, implementation, fp8=False):
  """The DSA core: top-k indices by indexer score, then sparse MLA over them -> [1, T, N, C]."""
  idx = indexer_api.index_topk(x["iq"], x["ik"], x["iw"], topk=K, **vis, implementation=implementation, fp8=fp8)
  return attention(x, idx, implementation)


def attention(x, idx, implementation):
  """The sparse MLA part of the layer over given top-k indices."""
  return sparse_mla_api.sparse_mla(x["q"], x["kv"], idx, scale=(C + R) ** -0.5, v_dim=C,
                                   implementation=implementation)[0]


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
    # Ours, the XLA path's chunk of float32 logits, and 6 GiB of index_topk's score blocks.
    if not timing.fits(f"dsa_core at T={T}", 2 * T * _BYTES_PER_TOKEN + 4 * XLA_CHUNK * I * T + 6 * 2**30):
      continue
    x, vis = inputs(T)
    ours = jax.jit(lambda x, vis: layer(x, vis, None))
    fp8 = jax.jit(lambda x, vis: layer(x, vis, None, fp8=True))
    xla = jax.jit(_xla_layer)
    progress = lambda name, seconds: print(f"dsa_core T={T}: {name} {seconds:.4f} s", flush=True) or seconds
    ours_s = progress("ours", timing.time_fn(ours, x, vis, warmup=1, iters=3))
    fp8_s = progress("ours, FP8 indexer", timing.time_fn(fp8, x, vis, warmup=1, iters=3))
    xla_s = progress("plain XLA", timing.time_fn(xla, x, vis, warmup=1, iters=2))
    dense_s = progress("cuDNN dense", baselines.cudnn_dense_mla_layer_seconds(T))
    last = slice(T - 256, T)
    want = xla(x, vis)[:, last].astype(jnp.float32)
    err = lambda fn: float(jnp.abs(fn(x, vis)[:, last].astype(jnp.float32) - want).max() / jnp.abs(want).max())
    # The same indices over all keys: one more compile of one scores kernel, not of every causal stage's.
    idx = jax.jit(lambda x, vis: indexer_api.index_topk(x["iq"], x["ik"], x["iw"], topk=K, **vis,
                                                        causal_prefix=False))(x, vis)
    sparse_mla_s = progress("the sparse MLA part", timing.time_fn(
        jax.jit(lambda x, idx: attention(x, idx, None)), x, idx, warmup=1, iters=3))
    row = dict(section="dsa_core", T=T, dsa_kernels_s=ours_s, dsa_xla_s=xla_s, cudnn_dense_s=dense_s,
               speedup_vs_dense=dense_s / ours_s, speedup_vs_xla=xla_s / ours_s, rel_err_last256=err(ours),
               dsa_kernels_fp8_indexer_s=fp8_s, fp8_indexer_speedup_vs_dense=dense_s / fp8_s,
               fp8_indexer_rel_err_last256=err(fp8), sparse_mla_part_s=sparse_mla_s)
    timing.emit(rows, row)
  return rows


SECTIONS = {"dsa_core": run}
