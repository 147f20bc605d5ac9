"""Benchmark section: the sparse MLA forward kernel's gather variants, forward only (a short GPU call).

Same inputs and FLOP count as `sparse_mla` (last 4096 queries, 128 heads, K = 2048): the Mosaic GPU forward
with the row copies issued by one thread of the gather warpgroup (the default) and by 2 or 4 of its warps
(`kernel_fwd.Config.gather_warps`), each checked against the XLA reference on the GPU.
"""

import jax

from experiments.bench_sections import timing
from experiments.bench_sections.sparse_mla import HEADS, LATENT, ROPE, SCALE, TOPK, _inputs, _rel_err
from pallas_kernels.sparse_mla import kernel_fwd, reference

GATHER_WARPS = (1, 2, 4)


def run(cfg: dict) -> list[dict]:
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    q, kv, idx = _inputs(T, HEADS)
    tq = q.shape[1]
    flops = 2.0 * tq * TOPK * HEADS * (LATENT + ROPE + LATENT)
    want_out, want_lse = jax.jit(lambda q, kv, idx: reference.sparse_mla(q, kv, idx, scale=SCALE,
                                                                         v_dim=LATENT))(q, kv, idx)
    for warps in GATHER_WARPS:
      fwd = jax.jit(lambda q, kv, idx, warps=warps: kernel_fwd.sparse_mla_fwd(
          q, kv, idx, scale=SCALE, v_dim=LATENT, config=kernel_fwd.Config(gather_warps=warps)))
      try:
        out, lse = fwd(q, kv, idx)
        seconds = timing.time_fn(fwd, q, kv, idx)
      except Exception as e:  # noqa: BLE001  a variant that does not compile must not hide the others
        rows.append(dict(section="sparse_mla_fwd", T=T, gather_warps=warps, error=str(e).splitlines()[0][:200]))
        continue
      rows.append(dict(section="sparse_mla_fwd", T=T, queries=tq, heads=HEADS, k=TOPK, gather_warps=warps,
                       ms=seconds * 1e3, tflops=timing.tflops(flops, seconds),
                       out_rel_err=_rel_err(out, want_out), lse_rel_err=_rel_err(lse, want_lse)))
      print(rows[-1], flush=True)
  return rows
