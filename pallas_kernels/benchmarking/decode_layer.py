"""Decode and prefill cost of one DeepSeek-V3.2 attention layer against the token's position (GPU; issue 23).

Run by `python -m experiments.bench_decode` (flags, the figure, the record); table: benchmarks/decode.md.

Decode, per context position P (4K ... 128K) and batch B (1, 32, 128), one step = one new token for each of the B
sequences, one layer, V3.2 shapes (128 heads over 576-dim latent entries, 64 x 128 indexer, top-2048), both
caches paged (page size 64); the latent cache FP8 (656 bytes per token, FlashMLA's layout) or bf16 (1152), the
indexer's keys FP8 (132 bytes per token):
  - sparse: `index_decode_topk` (scores of every cached key + top-2048) then `sparse_mla_decode` over them;
  - dense: `dense_mla_decode`, absorbed MQA over the whole cache: a kernel, so the comparison is against a
    fair dense decoder and not against XLA.
Bytes moved (the kernels are memory-bound; each cached byte is read once per step):
  indexer  B * (P * (H + 4) + I * H + 4 * I + 8 * K)      keys + scales, q (FP8), weights, indices + scores out
  sparse   B * (K * (E + 4) + N * (C + R) * 2 + N * C * 2)   gathered rows and their indices, q, out
  dense    B * (P * E + N * (C + R) * 2 + N * C * 2)          E = 656 (FP8) or 1152 (bf16) bytes per entry
and the achieved rate is compared with the device's copy bandwidth measured in the same run (a device-to-device
copy of 4 GiB: read + write bytes over time) and with the vendor's peak (`baselines.PEAK_HBM`). The per-kernel
sections `mla_decode` and `index_decode` of `experiments.bench_kernels` time each kernel against its XLA path.

Prefill, per T: one layer's DSA core (`pallas_kernels.benchmarking.dsa_core`: indexer + top-k + sparse MLA) and
cuDNN dense causal MLA attention (MHA mode, as V3.1 prefills), batch 1. The cost of the token at position p is
the marginal time (t(T_i) - t(T_i-1)) / (T_i - T_i-1) between consecutive measured lengths.

The figure (the paper's Figure 3 for our kernels): cost in USD per million tokens against position, prefill and
decode, sparse against dense: seconds per token x 61 layers x 1e6 / 3600 x --usd_per_gpu_hour. It counts the
attention core only (projections, MoE and the rest of a layer cost the same at every position and are left out).
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, dsa_core, timing
from pallas_kernels.index_decode import api as index_decode
from pallas_kernels.mla_decode import api as mla_decode
from pallas_kernels.mla_decode import reference as mla_decode_reference

I, H, K, N, C, R = 64, 128, 2048, 128, 512, 64  # V3.2: index heads x dim, top-k, heads, latent, RoPE dims
PAGE = 64
LAYERS = 61
ENTRY_BYTES = {"fp8": C + 4 * C // 128 + 2 * R, "bf16": 2 * (C + R)}  # 656 and 1152 bytes per token and layer

@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """One layer's paged caches for B sequences of P cached tokens and one query row per sequence."""
  q: jax.Array  # [B, N, C + R] bf16
  kv_nope: jax.Array  # [pages * PAGE, C] float8_e4m3fn (or bf16)
  kv_scale: jax.Array | None  # [pages * PAGE, C / 128] float32 (None for a bf16 cache)
  kv_rope: jax.Array  # [pages * PAGE, R] bf16
  iq: jax.Array  # [B, I, H] float8_e4m3fn
  iq_scale: jax.Array  # [B, I] float32
  iw: jax.Array  # [B, I] float32
  ik: jax.Array  # [pages * PAGE, H] float8_e4m3fn
  ik_scale: jax.Array  # [pages * PAGE] float32
  block_table: jax.Array  # [B, P / PAGE] int32, pages in shuffled order
  lengths: jax.Array  # [B] int32


jax.tree_util.register_dataclass(DecodeInputs, data_fields=[f.name for f in dataclasses.fields(DecodeInputs)],
                                 meta_fields=[])


def _fp8(key, shape):
  """Random e4m3 values in [-1.875, 1.875] straight from random bits (bit 6 cleared: no NaN, no big temporary)."""
  bits = jax.random.bits(key, shape, jnp.uint8) & 0xBF
  return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)


def decode_inputs(batch: int, position: int, cache: str) -> DecodeInputs:
  """Random caches (pages in shuffled order) and queries; the indexer's keys and queries are always FP8."""
  pages = batch * position // PAGE
  ks = jax.random.split(jax.random.key(0), 9)
  uniform = lambda k, shape, lo, hi: jax.random.uniform(k, shape, jnp.float32, lo, hi)
  fp8 = cache == "fp8"
  return DecodeInputs(
      q=(jax.random.normal(ks[0], (batch, N, C + R), jnp.float32) * 0.05).astype(jnp.bfloat16),
      kv_nope=_fp8(ks[1], (pages * PAGE, C)) if fp8 else jax.random.normal(ks[1], (pages * PAGE, C), jnp.bfloat16),
      kv_scale=uniform(ks[2], (pages * PAGE, C // 128), 0.5, 1.0) if fp8 else None,
      kv_rope=jax.random.normal(ks[3], (pages * PAGE, R), jnp.bfloat16),
      iq=_fp8(ks[4], (batch, I, H)), iq_scale=uniform(ks[5], (batch, I), 0.5, 1.0),
      iw=jax.random.normal(ks[6], (batch, I), jnp.float32) * I**-0.5,
      ik=_fp8(ks[7], (pages * PAGE, H)), ik_scale=uniform(ks[8], (pages * PAGE,), 0.5, 1.0),
      block_table=jax.random.permutation(jax.random.key(1), pages).astype(jnp.int32).reshape(batch, -1),
      lengths=jnp.full((batch,), position, jnp.int32))


def _scale():
  return (C + R) ** -0.5


def sparse_step(x: DecodeInputs, implementation: str = "pallas"):
  """Indexer scores + top-2048 over the cache, then sparse MLA over the selected entries -> [B, N, C]."""
  positions, _ = index_decode.index_decode_topk(x.iq, x.iq_scale, x.iw, x.ik, x.ik_scale, x.block_table, x.lengths,
                                                k=K, page_size=PAGE, implementation=implementation)
  rows = mla_decode_reference.pool_rows(x.block_table, positions, PAGE)
  return mla_decode.sparse_mla_decode(x.q, x.kv_nope, x.kv_scale, x.kv_rope, rows, scale=_scale(),
                                      implementation=implementation)[0]


def dense_step(x: DecodeInputs, implementation: str = "pallas"):
  """Absorbed-MQA attention over every cached entry -> [B, N, C]."""
  return mla_decode.dense_mla_decode(x.q, x.kv_nope, x.kv_scale, x.kv_rope, x.block_table, x.lengths,
                                     scale=_scale(), page_size=PAGE, implementation=implementation)[0]


def index_step(x: DecodeInputs, implementation: str = "pallas"):
  return index_decode.index_decode_topk(x.iq, x.iq_scale, x.iw, x.ik, x.ik_scale, x.block_table, x.lengths,
                                        k=K, page_size=PAGE, implementation=implementation)[0]


def decode_bytes(batch: int, position: int, cache: str) -> dict[str, float]:
  """Bytes each decode kernel must move in one step (formulas in the module docstring)."""
  q_out = N * (C + R) * 2 + N * C * 2
  indexer = batch * (position * (H + 4) + I * H + 4 * I + 8 * K)
  sparse = batch * (min(K, position) * (ENTRY_BYTES[cache] + 4) + q_out)
  dense = batch * (position * ENTRY_BYTES[cache] + q_out)
  return dict(indexer=indexer, sparse_mla=sparse, sparse=indexer + sparse, dense=dense)


def copy_tbps(nbytes: int = 4 * 2**30) -> float:
  """Device-to-device copy rate in TB/s (read + write) of a random uint8 array of nbytes."""
  x = jax.random.bits(jax.random.key(3), (nbytes,), jnp.uint8)
  seconds = timing.time_fn(jax.jit(lambda a: a + jnp.uint8(1)), x, iters=10)
  return 2 * nbytes / seconds / 1e12


def decode_rows(caches: list[str], batches: list[int], positions: list[int], copy_rate: float,
                peak: float | None) -> list[dict]:
  rows = []
  for cache in caches:
    for b in batches:
      for p in positions:
        nbytes = decode_bytes(b, p, cache)
        # The caches and the indexer's [B, P] float32 scores (if it materialises them), twice for safety.
        if not timing.fits(f"decode {cache} B={b} P={p}", 2 * b * p * (ENTRY_BYTES[cache] + H + 4 + 4)):
          continue
        x = decode_inputs(b, p, cache)
        row = dict(section="decode", cache=cache, batch=b, position=p)
        for name, fn in (("sparse", sparse_step), ("indexer", index_step), ("dense", dense_step)):
          try:
            seconds = timing.time_fn(jax.jit(fn), x, warmup=2, iters=10)
          except ValueError as e:  # a kernel that does not take these inputs (yet): said, not timed on XLA instead
            print(f"skipped {name} decode, {cache} cache: {e}", flush=True)
            continue
          row[f"{name}_step_s"] = seconds
          row[f"{name}_per_token_s"] = seconds / b
          row[f"{name}_tbps"] = nbytes[name] / seconds / 1e12
          row[f"{name}_of_copy"] = row[f"{name}_tbps"] / copy_rate
          if peak:
            row[f"{name}_of_peak"] = row[f"{name}_tbps"] * 1e12 / peak
        if "sparse_step_s" in row and "dense_step_s" in row:
          row["dense_over_sparse"] = row["dense_step_s"] / row["sparse_step_s"]
        print(row, flush=True)
        rows.append(row)
        del x
  return rows


def prefill_rows(lengths: list[int]) -> list[dict]:
  rows = []
  for t in lengths:
    if not timing.fits(f"prefill T={t}", 2 * t * dsa_core._BYTES_PER_TOKEN + 6 * 2**30):  # noqa: SLF001
      continue
    x, vis = dsa_core.inputs(t)
    dsa = timing.time_fn(jax.jit(lambda x, vis: dsa_core.layer(x, vis, None)), x, vis, warmup=1, iters=3)
    row = dict(section="prefill", T=t, dsa_s=dsa, cudnn_dense_s=baselines.cudnn_dense_mla_layer_seconds(t))
    print(row, flush=True)
    rows.append(row)
  return rows


def cost_curves(record: dict, usd_per_gpu_hour: float) -> dict[str, tuple[list[float], list[float]]]:
  """USD per million tokens against position for each (phase, attention) from a record's rows."""
  usd = lambda seconds_per_token: seconds_per_token * LAYERS * 1e6 / 3600 * usd_per_gpu_hour
  curves = {}
  prefill = sorted((r for r in record["rows"] if r.get("section") == "prefill"), key=lambda r: r["T"])
  for key, name in (("dsa_s", "prefill, sparse (DSA core)"), ("cudnn_dense_s", "prefill, dense (cuDNN)")):
    xs, ys, last_t, last_s = [], [], 0, 0.0
    for r in prefill:
      xs.append((last_t + r["T"]) / 2)
      ys.append(usd((r[key] - last_s) / (r["T"] - last_t)))
      last_t, last_s = r["T"], r[key]
    curves[name] = (xs, ys)
  decode = [r for r in record["rows"] if r.get("section") == "decode"]
  for cache in dict.fromkeys(r["cache"] for r in decode):
    b = max(r["batch"] for r in decode if r["cache"] == cache)
    for key in ("sparse", "dense"):
      pts = sorted((r["position"], usd(r[f"{key}_per_token_s"])) for r in decode
                   if r["batch"] == b and r["cache"] == cache and f"{key}_per_token_s" in r)
      if pts:
        curves[f"decode, {key} ({cache} cache, B={b})"] = ([p for p, _ in pts], [c for _, c in pts])
  return curves
