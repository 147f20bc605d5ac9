"""Benchmark sections of sparse MLA (run on the GPU by `experiments/bench_kernels.py`; tables in
benchmarks/sparse_mla.md).

Inputs at V3.2 shapes: per sequence length T (batch 1, keys 576 = 512 latent + 64 rope, top-k 2048), the last
4096 queries against S = T latent rows, selected indices uniform over the keys with 5% invalid, in the order
drawn ("random") or ascending as the model's `topk_indices` returns them ("sorted"). Useful FLOPs: the forward's
2 * Tq * K * N * (576 + 512); the backward counts 2.5x that (its five products per head and key, 576 + 512 + 576 +
576 + 512 = 2752 = 2.53 x 1088 multiply-adds), forward + backward 3.5x. Errors: max |got - want| / max |want|
against the float32 reference (and its vjp) on the first ERR_QUERIES queries, every implementation rerun there.

- "sparse_mla": the Pallas kernels against the XLA gather + einsum reference (forward), its autodiff (forward +
  backward, backward alone from saved residuals) and the chunked XLA backward (the deterministic path), 128 heads
  at every T and 64 heads at the first; the kernels also on sorted indices. An XLA baseline whose planned memory
  exceeds `timing.MEMORY_BUDGET_BYTES` (the autodiff on an 80 GB H100) is skipped with a printed message.
- "sparse_mla_gather": the kernels alone on random and sorted indices (a short GPU call).
- "parity_shapes": the training kernels at the parity model's shapes (`experiments/configs/train_small`).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import baselines, timing
from pallas_kernels.indexer_kl import api as kl_api
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.sparse_mla import api, chunked_bwd, kernel_bwd, kernel_fwd, reference

HEADS, LATENT, ROPE, TOPK, QUERIES = 128, 512, 64, 2048, 4096
SCALE = 0.1352338
ERR_QUERIES = 256
BWD_FLOPS, FWD_BWD_FLOPS = 2.5, 3.5  # multiples of the forward's useful FLOPs


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


def rel_err(got, want) -> float:
  finite = jnp.isfinite(want)
  got, want = (jnp.where(finite, x.astype(jnp.float32), 0.0) for x in (got, want))
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@functools.cache
def _fns() -> dict:
  """Jitted functions, made once so that every section shares the compiled ones. The indices are an argument,
  never a closure constant: XLA constant-folds the gather of a constant [Tq, K] index array for minutes."""
  ref = lambda q, kv, idx: reference.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT)
  autodiff = lambda q, kv, idx: jax.vjp(lambda q, kv: ref(q, kv, idx), q, kv)[1]
  loss = lambda impl: lambda q, kv, idx: jnp.sum(api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT,
                                                                 implementation=impl)[0].astype(jnp.float32))
  return dict(
      fwd_pallas=jax.jit(lambda q, kv, idx: kernel_fwd.sparse_mla_fwd(q, kv, idx, scale=SCALE, v_dim=LATENT)),
      fwd_xla=jax.jit(ref),
      bwd_pallas=jax.jit(lambda q, kv, idx, out, lse, do, dlse: kernel_bwd.sparse_mla_bwd(
          q, kv, idx, out, lse, do, dlse, scale=SCALE, v_dim=LATENT)),
      bwd_chunked=jax.jit(lambda q, kv, idx, out, lse, do, dlse: chunked_bwd.sparse_mla_bwd(
          q, kv, idx, out, lse, do, dlse, scale=SCALE, v_dim=LATENT)),
      autodiff_vjp=jax.jit(autodiff),  # the forward's residuals, so that the backward is timed alone
      apply_vjp=jax.jit(lambda vjp, do, dlse: vjp((do, dlse))),
      autodiff=jax.jit(lambda q, kv, idx, do, dlse: autodiff(q, kv, idx)((do, dlse))),
      grad_pallas=jax.jit(jax.grad(loss("pallas"), argnums=(0, 1))),
      grad_xla=jax.jit(jax.grad(loss("xla"), argnums=(0, 1))),
  )


def _cotangents(tq: int, heads: int):
  """Random cotangents of out [1, tq, heads, LATENT] (bf16) and lse [1, tq, heads]."""
  ks = jax.random.split(jax.random.key(7))
  return (jax.random.normal(ks[0], (1, tq, heads, LATENT), jnp.bfloat16),
          jax.random.normal(ks[1], (1, tq, heads), jnp.float32) * 0.1)


def _subset(*xs):
  return tuple(x[:, :ERR_QUERIES] for x in xs)


def _reference_subset(q, kv, idx, do, dlse) -> dict:
  """The float32 reference's out, lse, dq and dkv on the first ERR_QUERIES queries."""
  q, idx, do, dlse = _subset(q, idx, do, dlse)
  f32 = lambda x: x.astype(jnp.float32)
  out, lse = _fns()["fwd_xla"](f32(q), f32(kv), idx)
  dq, dkv = _fns()["autodiff"](f32(q), f32(kv), idx, f32(do), dlse)
  return dict(out=out, lse=lse, dq=dq, dkv=dkv)


def _bwd_errors(fn, q, kv, idx, out, lse, do, dlse, want) -> dict:
  """dq / dkv errors of the backward fn(q, kv, idx, out, lse, do, dlse) rerun on the first ERR_QUERIES queries."""
  q, idx, out, lse, do, dlse = _subset(q, idx, out, lse, do, dlse)
  dq, dkv = fn(q, kv, idx, out, lse, do, dlse)
  return dict(dq_rel_err=rel_err(dq, want["dq"]), dkv_rel_err=rel_err(dkv, want["dkv"]))


def _kernel_rows(rows: list[dict], base: dict, q, kv, idx, do, dlse, want, flops: float):
  """The Pallas forward and backward kernels on these indices: time, TFLOP/s and errors; -> (out, lse)."""
  fns = _fns()
  out, lse = fns["fwd_pallas"](q, kv, idx)
  seconds = timing.time_fn(fns["fwd_pallas"], q, kv, idx)
  o, l = _subset(out, lse)
  timing.emit(rows, dict(base, op="fwd", impl="pallas", ms=seconds * 1e3, tflops=timing.tflops(flops, seconds),
                   out_rel_err=rel_err(o, want["out"]), lse_rel_err=rel_err(l, want["lse"])))
  args = (q, kv, idx, out, lse, do, dlse)
  seconds = timing.time_fn(fns["bwd_pallas"], *args, iters=3)
  timing.emit(rows, dict(base, op="bwd", impl="pallas", ms=seconds * 1e3, tflops=timing.tflops(BWD_FLOPS * flops, seconds),
                   **_bwd_errors(fns["bwd_pallas"], *args, want)))
  return out, lse


def _setup(T: int, heads: int, section: str):  # noqa: N803
  """Inputs, cotangents, the reference on the error subset, FLOPs and the row base of one (T, heads)."""
  q, kv, idx = inputs(T, heads)
  tq = q.shape[1]
  do, dlse = _cotangents(tq, heads)
  flops = 2.0 * tq * TOPK * heads * (LATENT + ROPE + LATENT)
  base = dict(section=section, T=T, queries=tq, heads=heads, k=TOPK)
  return (q, kv, idx, do, dlse), _reference_subset(q, kv, idx, do, dlse), flops, base


def _xla_rows(rows: list[dict], base: dict, q, kv, idx, out, lse, do, dlse, want, flops: float) -> None:
  """The XLA baselines of one (T, heads) and the Pallas forward + backward beside them: the reference forward,
  its autodiff (forward + backward, and backward alone), the chunked backward. out, lse: the Pallas forward's."""
  fns = _fns()
  shape = f"T={base['T']}, {base['heads']} heads"
  if timing.fits_memory(f"XLA forward, {shape}", fns["fwd_xla"], q, kv, idx):
    seconds = timing.time_fn(fns["fwd_xla"], q, kv, idx)
    q_sub, idx_sub = _subset(q, idx)
    o, l = fns["fwd_xla"](q_sub, kv, idx_sub)
    timing.emit(rows, dict(base, op="fwd", impl="xla", ms=seconds * 1e3, tflops=timing.tflops(flops, seconds),
                     out_rel_err=rel_err(o, want["out"]), lse_rel_err=rel_err(l, want["lse"])))
  autodiff_fits = timing.fits_memory(f"XLA autodiff, {shape}", fns["autodiff"], q, kv, idx, do, dlse)
  for impl in ("pallas", "xla") if autodiff_fits else ("pallas",):
    seconds = timing.time_fn(fns[f"grad_{impl}"], q, kv, idx, iters=3)
    timing.emit(rows, dict(base, op="fwd+bwd", impl=impl, ms=seconds * 1e3,
                     tflops=timing.tflops(FWD_BWD_FLOPS * flops, seconds)))
  args = (q, kv, idx, out, lse, do, dlse)
  seconds = timing.time_fn(fns["bwd_chunked"], *args, iters=3)
  timing.emit(rows, dict(base, op="bwd", impl="chunked", ms=seconds * 1e3,
                   tflops=timing.tflops(BWD_FLOPS * flops, seconds), **_bwd_errors(fns["bwd_chunked"], *args, want)))
  # The backward alone holds the forward's residuals as arguments: more than the fused autodiff above needs (it ran
  # an 80 GB H100 out of memory at T = 8K while the fused one fit), so it is checked on its own.
  residuals = jax.eval_shape(fns["autodiff_vjp"], q, kv, idx)
  if autodiff_fits and timing.fits_memory(f"XLA autodiff's backward alone, {shape}", fns["apply_vjp"], residuals, do,
                                          dlse):
    vjp = fns["autodiff_vjp"](q, kv, idx)
    seconds = timing.time_fn(fns["apply_vjp"], vjp, do, dlse, iters=3)
    del vjp
    autodiff = lambda q, kv, idx, out, lse, do, dlse: fns["autodiff"](q, kv, idx, do, dlse)
    timing.emit(rows, dict(base, op="bwd", impl="xla_autodiff", ms=seconds * 1e3,
                     tflops=timing.tflops(BWD_FLOPS * flops, seconds), **_bwd_errors(autodiff, *args, want)))


def run(cfg: dict) -> list[dict]:
  """Section "sparse_mla": the kernels against the XLA baselines."""
  rows = []
  timing.emit(rows, dict(section="sparse_mla", op="xla_bf16_matmul_8192", tflops=baselines.matmul_tflops()))
  for T, heads in [(T, HEADS) for T in cfg["seq_lens"]] + [(cfg["seq_lens"][0], 64)]:  # noqa: N806
    (q, kv, idx, do, dlse), want, flops, base = _setup(T, heads, "sparse_mla")
    out, lse = _kernel_rows(rows, dict(base, indices="random"), q, kv, idx, do, dlse, want, flops)
    _xla_rows(rows, dict(base, indices="random"), q, kv, idx, out, lse, do, dlse, want, flops)
    _kernel_rows(rows, dict(base, indices="sorted"), q, kv, sorted_indices(idx), do, dlse, want, flops)
  return rows


def run_gather(cfg: dict) -> list[dict]:
  """Section "sparse_mla_gather": the kernels alone, 128 heads, on indices in random order and sorted."""
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    (q, kv, idx, do, dlse), want, flops, base = _setup(T, HEADS, "sparse_mla_gather")
    for order, order_idx in (("random", idx), ("sorted", sorted_indices(idx))):
      _kernel_rows(rows, dict(base, indices=order), q, kv, order_idx, do, dlse, want, flops)
  return rows


# The parity model `small` (experiments/configs/train_small): 16 heads of 320-dim entries (latent 256 + rope 64),
# top-k 512, an indexer of 16 heads x 64; every query of T tokens, causal random indices, 5% invalid.
P_HEADS, P_LATENT, P_ROPE, P_TOPK, P_INDEX_HEADS, P_INDEX_DIM = 16, 256, 64, 512, 16, 64
P_SCALE = (64 + 64) ** -0.5


def _parity_inputs(T: int):  # noqa: N803
  ks = jax.random.split(jax.random.key(3), 8)
  pos = jnp.arange(T, dtype=jnp.int32)
  q = jax.random.normal(ks[0], (1, T, P_HEADS, P_LATENT + P_ROPE), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, T, P_LATENT + P_ROPE), jnp.bfloat16)
  idx = (jax.random.uniform(ks[2], (1, T, P_TOPK)) * (pos[None, :, None] + 1)).astype(jnp.int32)  # causal
  idx = jnp.where(jax.random.uniform(ks[3], idx.shape) < 0.05, -1, idx)
  iq = jax.random.normal(ks[4], (1, T, P_INDEX_HEADS, P_INDEX_DIM), jnp.bfloat16)
  ik = jax.random.normal(ks[5], (1, T, P_INDEX_DIM), jnp.bfloat16)
  w = jax.random.normal(ks[6], (1, T, P_INDEX_HEADS), jnp.float32) * (P_INDEX_HEADS * P_INDEX_DIM) ** -0.5
  return q, kv, idx, (iq, ik, w), dict(q_positions=pos[None], kv_positions=pos[None],
                                      q_segment_ids=jnp.zeros((1, T), jnp.int32),
                                      kv_segment_ids=jnp.zeros((1, T), jnp.int32))


def _parity_mla_rows(rows, base, q, kv, idx) -> None:
  """The sparse MLA backward kernel against the float32 reference's vjp."""
  ref = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=P_SCALE, v_dim=P_LATENT)
  f32 = lambda x: x.astype(jnp.float32)
  (out, lse), vjp = jax.vjp(ref, f32(q), f32(kv))
  ks = jax.random.split(jax.random.key(9))
  do, dlse = jax.random.normal(ks[0], out.shape, jnp.float32), jax.random.normal(ks[1], lse.shape, jnp.float32)
  want_dq, want_dkv = vjp((do, dlse))
  fn = jax.jit(lambda q, kv, idx, out, lse, do, dlse: kernel_bwd.sparse_mla_bwd(
      q, kv, idx, out, lse, do, dlse, scale=P_SCALE, v_dim=P_LATENT))
  args = (q, kv, idx, out.astype(q.dtype), lse, do.astype(q.dtype), dlse)
  dq, dkv = jax.block_until_ready(fn(*args))
  timing.emit(rows, dict(base, op="sparse_mla_bwd", ms=timing.time_fn(fn, *args) * 1e3, dq_err=rel_err(dq, want_dq),
                   dkv_err=rel_err(dkv, want_dkv)))


def _parity_kl_rows(rows, base, q, kv, idx, idx_args, vis) -> None:
  """The sparse indexer KL (value and indexer gradients) through the Pallas path against the XLA path on float32
  inputs."""
  lse = reference.sparse_mla(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=P_SCALE, v_dim=P_LATENT)[1]
  fixed = (q, kv, lse, idx, vis)  # arguments, not closure constants: XLA would constant-fold their gathers

  def value_and_grads(impl):
    def kl(idx_args, fixed):
      q, kv, lse, idx, vis = fixed
      return kl_api.sparse_kl(q, kv, lse, P_SCALE, *idx_args, idx, **vis, implementation=impl).sum()
    return jax.jit(jax.value_and_grad(kl))

  want_kl, want_grads = value_and_grads("xla")(jax.tree.map(lambda x: x.astype(jnp.float32), idx_args), fixed)
  step = value_and_grads("pallas")
  got_kl, got = jax.block_until_ready(step(idx_args, fixed))
  row = dict(base, op="sparse_kl fwd+bwd", ms=timing.time_fn(step, idx_args, fixed) * 1e3,
             kl_err=rel_err(got_kl, want_kl))
  timing.emit(rows, dict(row, **{f"{n}_err": rel_err(g, w) for n, g, w in zip(("d_iq", "d_ik", "d_w"), got, want_grads)}))


def _parity_indexer_rows(rows, base, idx_args, vis) -> None:
  """The indexer scores through the Pallas path against the float32 reference (error on finite scores, same -inf
  mask), and index_topk's selections through it against the XLA path's."""
  iq, ik, w = idx_args
  want = indexer_reference.index_scores(*(x.astype(jnp.float32) for x in idx_args), **vis)
  finite = jnp.isfinite(want)
  fn = jax.jit(lambda iq, ik, w: indexer_api.index_scores(iq, ik, w, **vis, implementation="pallas"))
  got = jax.block_until_ready(fn(iq, ik, w))
  err = float(jnp.max(jnp.where(finite, jnp.abs(got - want), 0.0)) / jnp.max(jnp.where(finite, jnp.abs(want), 0.0)))
  timing.emit(rows, dict(base, op="index_scores", ms=timing.time_fn(fn, iq, ik, w) * 1e3, rel_err=err,
                   mask_ok=bool(jnp.array_equal(finite, jnp.isfinite(got)))))
  topk = jax.jit(lambda iq, ik, w, impl: indexer_api.index_topk(iq, ik, w, topk=P_TOPK, **vis, implementation=impl),
                 static_argnums=3)
  got, ref = topk(iq, ik, w, "pallas"), topk(iq, ik, w, "xla")
  scores = indexer_reference.index_scores(iq, ik, w, **vis)
  mass = lambda i: jnp.where(i >= 0, jnp.take_along_axis(scores, jnp.maximum(i, 0), -1), 0.0).sum(-1)
  timing.emit(rows, dict(base, op="index_topk", ms=timing.time_fn(topk, iq, ik, w, "pallas") * 1e3,
                   same_rows=float(jnp.mean(jnp.all(got == ref, axis=-1))),
                   mass_rel_err=float(jnp.max(jnp.abs(mass(got) - mass(ref)) / jnp.maximum(jnp.abs(mass(ref)), 1e-6)))))


def run_parity_shapes(cfg: dict) -> list[dict]:
  """Section "parity_shapes": on one row of T = `seq_lens` tokens, the indexer scores and index_topk, the sparse
  MLA backward and the sparse indexer KL, each through its default Pallas path."""
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    q, kv, idx, idx_args, vis = _parity_inputs(T)
    base = dict(section="parity_shapes", T=T)
    # Each part is named before it runs, so that one that hangs on the GPU is named in the log.
    print("parity_shapes: indexer scores and index_topk ...", flush=True)
    _parity_indexer_rows(rows, base, idx_args, vis)
    print("parity_shapes: sparse MLA backward ...", flush=True)
    _parity_mla_rows(rows, base, q, kv, idx)
    print("parity_shapes: sparse indexer KL ...", flush=True)
    _parity_kl_rows(rows, base, q, kv, idx, idx_args, vis)
  return rows


SECTIONS = {"sparse_mla": run, "sparse_mla_gather": run_gather, "parity_shapes": run_parity_shapes}
