"""Benchmark section: the training kernels at the parity model's shapes (`small`, `experiments/configs/train_small`).

The V3.2-shape sections check the kernels at 128 heads and 576-dim entries; the parity run trains `small`: 16
heads of 320-dim entries (latent 256 + rope 64, values 256), top-k 512, an indexer of 16 heads x 64, T = 8K.
On one row of T = `seq_lens` tokens: the indexer scores kernel with each `key_warpgroups` option against the float32
reference, and `index_topk`'s selections against the XLA path's; then per variant (all queries, causal random
indices, 5% invalid) the sparse MLA backward kernel with each dkv addition (`BACKWARD_VARIANTS`), its dq / dkv
against the float32 reference's vjp, and the sparse indexer KL (value and indexer gradients) through the kernels
against the XLA path on float32 inputs. Each row says which variant it is before it runs (printed),
so that a variant that hangs on the GPU is named in the log even when a timeout kills the process.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from experiments.bench_sections.sparse_mla import rel_err
from pallas_kernels.indexer_kl import api as kl_api
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.lightning_indexer import kernel as indexer_kernel
from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.sparse_mla import kernel_bwd, reference

HEADS, LATENT, ROPE, TOPK, INDEX_HEADS, INDEX_DIM = 16, 256, 64, 512, 16, 64
SCALE = (64 + 64) ** -0.5
# The backward's dkv additions: the default (TMA reduce-adds of 128-column slabs here, the next block's indices
# prefetched, the key block released per chunk), 64-column slabs, `red_add`, and the default without the prefetch
# and split release (the default before session 7 of 2026-11-29), and the bulk reduce-adds one row per thread.
BACKWARD_VARIANTS = {"tma": {}, "tma_slab64": dict(slab_cols=64), "red": dict(reduce="red"),
                     "no_prefetch": dict(prefetch_idx=False), "bulk": dict(reduce="bulk")}

def _inputs(T: int):  # noqa: N803
  ks = jax.random.split(jax.random.key(3), 8)
  pos = jnp.arange(T, dtype=jnp.int32)
  q = jax.random.normal(ks[0], (1, T, HEADS, LATENT + ROPE), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, T, LATENT + ROPE), jnp.bfloat16)
  idx = (jax.random.uniform(ks[2], (1, T, TOPK)) * (pos[None, :, None] + 1)).astype(jnp.int32)  # causal
  idx = jnp.where(jax.random.uniform(ks[3], idx.shape) < 0.05, -1, idx)
  iq = jax.random.normal(ks[4], (1, T, INDEX_HEADS, INDEX_DIM), jnp.bfloat16)
  ik = jax.random.normal(ks[5], (1, T, INDEX_DIM), jnp.bfloat16)
  w = jax.random.normal(ks[6], (1, T, INDEX_HEADS), jnp.float32) * (INDEX_HEADS * INDEX_DIM) ** -0.5
  return q, kv, idx, (iq, ik, w), dict(q_positions=pos[None], kv_positions=pos[None],
                                      q_segment_ids=jnp.zeros((1, T), jnp.int32),
                                      kv_segment_ids=jnp.zeros((1, T), jnp.int32))


def _mla_rows(T, q, kv, idx) -> list[dict]:  # noqa: N803
  ref = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=SCALE, v_dim=LATENT)
  f32 = lambda x: x.astype(jnp.float32)
  (out, lse), vjp = jax.vjp(ref, f32(q), f32(kv))
  ks = jax.random.split(jax.random.key(9))
  do, dlse = jax.random.normal(ks[0], out.shape, jnp.float32), jax.random.normal(ks[1], lse.shape, jnp.float32)
  want_dq, want_dkv = vjp((do, dlse))
  rows = []
  for variant, options in BACKWARD_VARIANTS.items():
    print(f"parity_shapes: sparse MLA backward, {variant} ...", flush=True)
    fn = jax.jit(lambda q, kv, idx, out, lse, do, dlse, options=options: kernel_bwd.sparse_mla_bwd(
        q, kv, idx, out, lse, do, dlse, scale=SCALE, v_dim=LATENT, **options))
    args = (q, kv, idx, out.astype(q.dtype), lse, do.astype(q.dtype), dlse)
    dq, dkv = jax.block_until_ready(fn(*args))
    rows.append(dict(section="parity_shapes", T=T, op="sparse_mla_bwd", variant=variant,
                     ms=timing.time_fn(fn, *args) * 1e3, dq_err=rel_err(dq, want_dq), dkv_err=rel_err(dkv, want_dkv)))
    print(rows[-1], flush=True)
  return rows


def _kl_rows(T, q, kv, idx, idx_args, vis) -> list[dict]:  # noqa: N803
  lse = reference.sparse_mla(q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=SCALE, v_dim=LATENT)[1]
  fixed = (q, kv, lse, idx, vis)  # arguments, not closure constants: XLA would constant-fold their gathers

  def kl(implementation):
    """(indexer args, fixed) -> KL [1, T] through `implementation`."""
    def f(idx_args, fixed):
      q, kv, lse, idx, vis = fixed
      return kl_api.sparse_kl(q, kv, lse, SCALE, *idx_args, idx, **vis, implementation=implementation)
    return f

  value_and_grads = lambda f: jax.jit(jax.value_and_grad(lambda idx_args, fixed: f(idx_args, fixed).sum()))
  want_kl, want_grads = value_and_grads(kl("xla"))(jax.tree.map(lambda x: x.astype(jnp.float32), idx_args), fixed)
  print("parity_shapes: sparse indexer KL, pallas ...", flush=True)
  step = value_and_grads(kl("pallas"))
  got_kl, got = jax.block_until_ready(step(idx_args, fixed))
  row = dict(section="parity_shapes", T=T, op="sparse_kl fwd+bwd", variant="pallas",
             ms=timing.time_fn(step, idx_args, fixed) * 1e3, kl_err=rel_err(got_kl, want_kl))
  row.update({f"{n}_err": rel_err(g, w) for n, g, w in zip(("d_iq", "d_ik", "d_w"), got, want_grads)})
  print(row, flush=True)
  return [row]


def _scores_rows(T, idx_args, vis) -> list[dict]:  # noqa: N803
  """The indexer scores kernel at 16 heads x 64 with each key_warpgroups option against the float32 reference
  (error on finite scores, same -inf mask), and index_topk's selections through it against the reference's."""
  iq, ik, w = idx_args
  want = indexer_reference.index_scores(*(x.astype(jnp.float32) for x in idx_args), **vis)
  finite = jnp.isfinite(want)
  rows = []
  for key_warpgroups in indexer_kernel.KEY_WARPGROUPS:
    print(f"parity_shapes: indexer scores, key_warpgroups={key_warpgroups} ...", flush=True)
    fn = jax.jit(lambda iq, ik, w, kwg=key_warpgroups: indexer_kernel.index_scores(iq, ik, w, **vis,
                                                                                  key_warpgroups=kwg))
    got = jax.block_until_ready(fn(iq, ik, w))
    err = float(jnp.max(jnp.where(finite, jnp.abs(got - want), 0.0)) / jnp.max(jnp.where(finite, jnp.abs(want), 0.0)))
    rows.append(dict(section="parity_shapes", T=T, op="index_scores", variant=f"key_warpgroups={key_warpgroups}",
                     ms=timing.time_fn(fn, iq, ik, w) * 1e3, rel_err=err,
                     mask_ok=bool(jnp.array_equal(finite, jnp.isfinite(got)))))
    print(rows[-1], flush=True)
  topk = jax.jit(lambda iq, ik, w, impl: indexer_api.index_topk(iq, ik, w, topk=TOPK, **vis, implementation=impl),
                 static_argnums=3)
  got, ref = topk(iq, ik, w, "pallas"), topk(iq, ik, w, "xla")
  scores = indexer_reference.index_scores(iq, ik, w, **vis)
  mass = lambda i: jnp.where(i >= 0, jnp.take_along_axis(scores, jnp.maximum(i, 0), -1), 0.0).sum(-1)
  rows.append(dict(section="parity_shapes", T=T, op="index_topk", variant="default",
                   ms=timing.time_fn(topk, iq, ik, w, "pallas") * 1e3,
                   same_rows=float(jnp.mean(jnp.all(got == ref, axis=-1))),
                   mass_rel_err=float(jnp.max(jnp.abs(mass(got) - mass(ref)) / jnp.maximum(jnp.abs(mass(ref)), 1e-6)))))
  print(rows[-1], flush=True)
  return rows


def run(cfg: dict) -> list[dict]:
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    q, kv, idx, idx_args, vis = _inputs(T)
    rows += _scores_rows(T, idx_args, vis)
    rows += _mla_rows(T, q, kv, idx)
    rows += _kl_rows(T, q, kv, idx, idx_args, vis)
  return rows
