"""Benchmark section: the sparse MLA kernels' gather, dkv-reduction and index-order variants (a short GPU call).

Same inputs and FLOP counts as `sparse_mla` (last 4096 queries, 128 heads, K = 2048, indices uniform over the
keys). The backward (`kernel_bwd.sparse_mla_bwd`) in the configurations of BACKWARD_CONFIGS: a configuration's
`indices` field ("random", the default, or "sorted": the same entries ascending, as `topk_indices` returns them,
`sparse_mla.sorted_indices`) picks the inputs, the other fields are the kernel's arguments (the gather, the
options of the path between key blocks, of the dkv reductions and of the launch order). The first configuration
is the baseline whose dq / dkv the others are compared with (their reduce-adds make the rounding vary from run to
run anyway); rows with `skip` time it without its row copies or its dkv additions (diagnostics). The forward
(FORWARD_CONFIGS, `kernel_fwd.Config` fields and `indices`) is checked against the XLA reference. Earlier
configurations (TMA gathers, bulk reduce-adds, block orders, `Config.skip` diagnostics): benchmarks/results and
docs/kernels.md.
"""

import inspect

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing
from experiments.bench_sections.sparse_mla import (HEADS, LATENT, ROPE, SCALE, TOPK, inputs, rel_err,
                                                   sorted_indices)
from pallas_kernels.sparse_mla import kernel_bwd, kernel_fwd, reference

# Forward configurations (`kernel_fwd.Config` fields, and `indices`); any with `skip` would time the forward without
# its row copies or without its math (diagnostics: their outputs are not checked).
FORWARD_CONFIGS = (dict(gather="cp_async"), dict(gather="cp_async", indices="sorted"))
# Backward configurations (`kernel_bwd.sparse_mla_bwd` arguments and `indices`; the first is the baseline): the
# default on indices in random order and sorted (session 9 of 2026-11-30: the same time; the block orders tried
# that session are in benchmarks/results and docs/kernels.md).
BACKWARD_CONFIGS = (dict(gather="cp_async"), dict(gather="cp_async", indices="sorted"))
# The options every row shows, at `kernel_bwd.sparse_mla_bwd`'s defaults where a configuration leaves them out.
BACKWARD_OPTIONS = ("gather_warps", "reduce_warps", "reduce", "slab_cols", "prefetch_idx", "split_release",
                    "adjacent_tiles", "skip")


def backward_arguments(fields: dict) -> dict:
  """The keyword arguments of `kernel_bwd.sparse_mla_bwd` for one of BACKWARD_CONFIGS: its fields (less
  `indices`) over the kernel's own defaults (read from its signature, so that the rows never show a stale
  default)."""
  parameters = inspect.signature(kernel_bwd.sparse_mla_bwd).parameters
  return dict({name: parameters[name].default for name in BACKWARD_OPTIONS}, **_kernel_fields(fields))


def _kernel_fields(fields: dict) -> dict:
  """A configuration's fields less `indices` (which picks the inputs, not a kernel argument)."""
  return {k: v for k, v in fields.items() if k != "indices"}


def _timed(rows: list[dict], base: dict, fn, *args):
  """Runs and times fn(*args) into a row of `base`; -> its output, or None with the error in the row (a variant
  that does not compile must not hide the others)."""
  try:
    out = jax.block_until_ready(fn(*args))
    seconds = timing.time_fn(fn, *args)
  except Exception as e:  # noqa: BLE001
    rows.append(dict(base, error=str(e).splitlines()[0][:200]))
    return None
  rows.append(dict(base, ms=seconds * 1e3))
  return out


def run(cfg: dict, backward_configs=BACKWARD_CONFIGS, forward_configs=FORWARD_CONFIGS,
        section: str = "sparse_mla_gather") -> list[dict]:
  rows = []
  for T in cfg["seq_lens"]:  # noqa: N806
    q, kv, idx = inputs(T, HEADS)
    by_order = dict(random=(q, kv, idx), sorted=(q, kv, sorted_indices(idx)))
    tq = q.shape[1]
    flops = 2.0 * tq * TOPK * HEADS * (LATENT + ROPE + LATENT)
    want_out, want_lse = jax.jit(lambda q, kv, idx: reference.sparse_mla(q, kv, idx, scale=SCALE,
                                                                         v_dim=LATENT))(q, kv, idx)
    ks = jax.random.split(jax.random.key(1), 2)
    do = jax.random.normal(ks[0], want_out.shape, jnp.bfloat16)
    dlse = jax.random.normal(ks[1], want_lse.shape, jnp.float32)
    base = dict(section=section, T=T, queries=tq, heads=HEADS, k=TOPK)
    want_grads = None
    for config in backward_configs:
      order = config.get("indices", "random")
      fields = backward_arguments(config)
      bwd = jax.jit(lambda q, kv, idx, out, lse, do, dlse, fields=fields: kernel_bwd.sparse_mla_bwd(
          q, kv, idx, out, lse, do, dlse, scale=SCALE, v_dim=LATENT, **fields))
      skip = fields["skip"]
      shown = {k: ("default" if v is None else v) for k, v in fields.items() if k != "skip"}
      grads = _timed(rows, dict(base, op=f"bwd without {skip}" if skip else "bwd", indices=order, **shown), bwd,
                     *by_order[order], want_out, want_lse, do, dlse)
      if grads is not None and not skip:
        rows[-1]["tflops"] = timing.tflops(2.5 * flops, rows[-1]["ms"] / 1e3)
        if want_grads is None:
          want_grads = grads
        else:
          rows[-1].update(dq_diff_vs_1=rel_err(grads[0], want_grads[0]), dkv_diff_vs_1=rel_err(grads[1], want_grads[1]))
      print(rows[-1], flush=True)
    del want_grads
    for fields in forward_configs:
      order = fields.get("indices", "random")
      config = kernel_fwd.Config(**_kernel_fields(fields))
      fwd = jax.jit(lambda q, kv, idx, config=config: kernel_fwd.sparse_mla_fwd(
          q, kv, idx, scale=SCALE, v_dim=LATENT, config=config))
      got = _timed(rows, dict(base, op=f"fwd without {config.skip}" if config.skip else "fwd", indices=order,
                              gather=config.gather, gather_warps=config.gather_warps,
                              adjacent_tiles=config.adjacent_tiles), fwd, *by_order[order])
      if got is not None and not config.skip:
        rows[-1].update(tflops=timing.tflops(flops, rows[-1]["ms"] / 1e3), out_rel_err=rel_err(got[0], want_out),
                        lse_rel_err=rel_err(got[1], want_lse))
      print(rows[-1], flush=True)
  return rows
