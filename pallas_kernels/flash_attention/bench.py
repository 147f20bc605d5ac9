"""Benchmark section "flash_attention": dense causal attention at V3.2 shapes (GPU machine).

Per T in cfg["seq_lens"] (batch 1, one document, positions 0..T-1, bf16):
  * "mha": MLA's MHA mode, the dense baseline: 128 heads, q/k 192, v 128;
  * "mqa": MLA's MQA mode, the dense warm-up: 128 heads sharing one key of 576 and one value of 512.
Implementations: "cudnn" (`api` with implementation="cudnn", the default one document a row), "cudnn_packed8"
(the packed layout with 8 sequences a row: the cost of packing; skipped where its backward's float32 dq
accumulators, 8 x T x N x Hk, pass PACKED_DQ_BUDGET), "xla" (`chunked`, default blocks; up to XLA_MAX_T, beyond
which one call takes minutes) and "reference" where XLA's memory analysis of it fits `MEMORY_BUDGET` (else a
printed skip). cuDNN does not take MQA mode's head dims.
Ops: "fwd" (out and lse) and "fwd+bwd" (grad of sum(out) w.r.t. q, k, v).

FLOPs, causal (half of T x S counted):  forward = 2 * B * N * (T * S / 2) * (Hk + Hv);  backward = 2.5 x forward,
so fwd+bwd = 3.5 x forward.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from pallas_kernels.flash_attention import api, cudnn, reference

HEADS = 128
SHAPES = {"mha": (192, 128, False), "mqa": (576, 512, True)}  # (Hk, Hv, keys shared by all heads)
MEMORY_BUDGET = 75 * 2**30
PACKED_SEGMENTS = 8
PACKED_DQ_BUDGET = 40 * 2**30
XLA_MAX_T = 32768


def _inputs(t: int, shape: str):
  hk, hv, shared = SHAPES[shape]
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, t, HEADS, hk), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, hk) if shared else (1, t, HEADS, hk), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, t, hv) if shared else (1, t, HEADS, hv), jnp.bfloat16)
  ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
  return q, k, v, ids, jnp.zeros((1, t), jnp.int32)


def _functions(impl: str, hk: int):
  """(forward, forward+backward) of one implementation: (q, k, v, positions, segment ids) -> outputs."""
  kwargs = dict(implementation="xla" if impl == "xla" else "cudnn",
                max_segments=PACKED_SEGMENTS if impl == "cudnn_packed8" else cudnn.DEFAULT_MAX_SEGMENTS)
  attend = reference.attention if impl == "reference" else lambda *a, **kw: api.flash_attention(*a, **kw, **kwargs)
  forward = lambda q, k, v, pos, seg: attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                             kv_segment_ids=seg, scale=hk**-0.5)
  loss = lambda q, k, v, pos, seg: jnp.sum(forward(q, k, v, pos, seg)[0].astype(jnp.float32))
  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _skip(impl: str, shape: str, t: int, args) -> str | None:
  """Why this implementation is not timed here, or None."""
  hk = SHAPES[shape][0]
  if impl.startswith("cudnn") and cudnn.unsupported(*args[:3]):
    return cudnn.unsupported(*args[:3])
  if impl == "cudnn_packed8" and PACKED_SEGMENTS * t * HEADS * hk * 4 > PACKED_DQ_BUDGET:
    return f"its backward's float32 dq accumulators alone take {PACKED_SEGMENTS * t * HEADS * hk * 4 / 2**30:.0f} GiB"
  if impl == "xla" and t > XLA_MAX_T:
    return f"timed up to T = {XLA_MAX_T}: beyond, one call of the chunked XLA path takes minutes"
  if impl == "reference":
    if HEADS * t * t * 4 > MEMORY_BUDGET:  # its float32 logits alone
      return f"the float32 [N, T, S] logits alone take {HEADS * t * t * 4 / 2**30:.0f} GiB"
    peak = timing.peak_bytes_of(_functions(impl, hk)[1], *args)
    if peak is not None and peak > MEMORY_BUDGET:
      return f"XLA's memory analysis of its fwd+bwd: {peak / 2**30:.0f} GiB"
  return None


def run(cfg: dict) -> list[dict]:
  rows = []
  for t in cfg["seq_lens"]:
    for shape, (hk, hv, _) in SHAPES.items():
      args = _inputs(t, shape)
      flops = 2.0 * HEADS * (t * t / 2) * (hk + hv)
      for impl in ("cudnn", "cudnn_packed8", "xla", "reference"):
        base = dict(section="flash_attention", shape=shape, T=t, impl=impl)
        reason = _skip(impl, shape, t, args)
        if reason:
          print(dict(base, skipped=reason), flush=True)
          continue
        for op, fn, factor in zip(("fwd", "fwd+bwd"), _functions(impl, hk), (1.0, 3.5)):
          seconds = timing.time_fn(fn, *args, warmup=1, iters=3)
          timing.emit(rows, dict(base, op=op, ms=seconds * 1e3, tflops=timing.tflops(factor * flops, seconds)))
  return rows


SECTIONS = {"flash_attention": run}
