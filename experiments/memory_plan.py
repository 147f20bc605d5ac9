"""The 671B memory plan: per-GPU bytes of parameters, gradients, AdamW state and 128K-token activations on
candidate H200 meshes (256 GPUs = 32 hosts x 8), from abstract arrays only; then one forward+backward of a
few 671B-sized layers cross-lowered for that mesh with abstract devices.

  python -m experiments.memory_plan                                 # -> /tmp/dsa_jax/memory_plan/<time>/
  python -m experiments.memory_plan --out=docs/reports/memory_plan.md --overwrite  # the committed report

It also compiles a few 671B-sized layers for 8 simulated CPU devices, to check that XLA partitions them.
"""

import os
import sys
import textwrap
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp
from absl import flags
from jax.sharding import NamedSharding

from dsa_jax.model import config, functional
from dsa_jax.sharding import expert_parallel, memory, partition, rules
from dsa_jax.sharding.mesh import AXES, MeshConfig, make_abstract_mesh, make_mesh
from dsa_jax.training import optimizer as optim
from dsa_jax.training import state as train_state
from experiments import cli

_MESHES = flags.DEFINE_list("meshes", ["fsdp=256", "fsdp=32:expert=8", "fsdp=4:expert=8:context=8",
                                       "fsdp=2:expert=8:context=8:tensor=2", "expert=8:context=32"],
                            "Candidate meshes, axis=size joined by ':' (unnamed axes are 1).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 131072, "Tokens of the one sequence each batch shard holds.",
                                    lower_bound=1)
_HBM_GB = flags.DEFINE_float("hbm_gb", 141.0, "Memory per GPU (H200: 141 GB).", lower_bound=0.0)
_LOWER_LAYERS = flags.DEFINE_integer("lower_layers", 61, "Layers of the model lowered (first 3 dense, then MoE).",
                                        lower_bound=1)
_CPU_MESH = flags.DEFINE_string("cpu_mesh", "fsdp=2:expert=4", "Mesh of the CPU compile ('' = skip it).")
_CPU_SEQ = flags.DEFINE_integer("cpu_seq", 4096, "Sequence length of the CPU compile (4 layers).",
                                    lower_bound=1)
_LOWER_SEQ = flags.DEFINE_integer("lower_seq", 131072, "Sequence length of the lowered step.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "", "Where the report goes (default: a new /tmp/dsa_jax/memory_plan/<time>/"
                           "memory_plan.md); an existing file only with --overwrite.")

GB = 1e9


def parse_mesh(text: str) -> MeshConfig:
  try:
    sizes = {axis: int(size) for axis, size in (item.split("=") for item in text.split(":"))}
  except ValueError:
    raise cli.UserError(f"--meshes entry {text!r} is invalid; allowed: axis=size joined by ':' "
                        "(e.g. fsdp=32:expert=8).") from None
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise cli.UserError(f"--meshes axis {sorted(unknown)} is invalid; allowed: {AXES}.")
  with cli.user_errors():
    return MeshConfig(**sizes)


def plan_row(cfg, mesh_cfg: MeshConfig) -> dict:
  """Per-device GB of every part of the training state and the activations on one mesh."""
  mesh_cfg.validate_model(cfg)
  mesh = make_abstract_mesh(mesh_cfg)
  model = functional.abstract_state(cfg)
  params, other = train_state.split_model_state(model)
  opt = jax.eval_shape(optim.build(optim.OptimizerConfig(), "sparse").init, params)
  place = lambda tree: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                                    partition.shardings_like(tree, model, mesh))
  params_b = memory.sharded_bytes(place(params)) + memory.sharded_bytes(place(other))
  opt_b = memory.sharded_bytes(place(opt))
  act = memory.activation_bytes(cfg, mesh_cfg, _SEQ_LEN.value)
  total = 2 * params_b + opt_b + act.total  # parameters + their gradients + AdamW + activations
  name = " x ".join(f"{a} {n}" for a, n in zip(AXES, mesh_cfg.shape) if n > 1)
  return {"mesh": name, "params": params_b / GB, "grads": params_b / GB, "adamw": opt_b / GB,
          "act (est.)": act.total / GB, "= ckpt": act.checkpoints / GB, "+ layer": act.layer_working_set / GB,
          "+ keys": act.gathered_keys / GB, "+ logits": act.logits / GB, "total": total / GB,
          "fits": "yes" if total / GB <= _HBM_GB.value else "no"}


def _traced_step(cfg, mesh, b: int, t: int):
  """jit(value_and_grad(mean logsumexp of the logits)) traced on abstract sharded inputs."""
  state = partition.abstract_sharded_state(functional.abstract_state(cfg), mesh)
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, rules.batch_bt()))

  def loss(state, ids, positions):
    out = functional.apply(cfg, state, ids, positions=positions, expert_dispatch=expert_parallel.make_dispatch(mesh))
    return jnp.mean(jax.nn.logsumexp(out.logits, axis=-1))

  with rules.activate(mesh):
    return jax.jit(jax.value_and_grad(loss)).trace(state, tokens, tokens)


def lower_step(cfg, mesh_cfg: MeshConfig) -> str:
  """Cross-lowers forward + backward (sparse attention, expert-parallel MoE) for CUDA on abstract devices."""
  small = cfg.replace(num_layers=_LOWER_LAYERS.value, num_mtp_layers=0)
  b, t = mesh_cfg.batch_shards, _LOWER_SEQ.value
  start = time.time()
  mesh = make_abstract_mesh(mesh_cfg)
  with rules.activate(mesh):
    lowered = _traced_step(small, mesh, b, t).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  return (f"Lowered forward+backward of {_LOWER_LAYERS.value} layers ({small.first_k_dense} dense, "
          f"{_LOWER_LAYERS.value - small.first_k_dense} MoE) of the 671B config, batch {b} x {t} tokens, "
          f"for CUDA on the abstract {mesh_cfg.size}-device mesh ({dict(zip(AXES, mesh_cfg.shape))}) in "
          f"{time.time() - start:.1f} s: {len(text) / 1e6:.1f} MB of StableHLO, "
          f"{text.count('all_to_all')} all_to_all, {text.count('sdy.') + text.count('mhlo.sharding')} "
          f"sharding annotations. Not compiled for it: compiling needs the {mesh_cfg.size} real devices.")


def compile_on_cpu(cfg, mesh_cfg: MeshConfig) -> str:
  """Compiles forward + backward of 4 layers of 671B width on the simulated CPU devices; XLA's own sizes."""
  small = cfg.replace(num_layers=4, num_mtp_layers=0)
  mesh = make_mesh(mesh_cfg)
  b, t = mesh_cfg.batch_shards, _CPU_SEQ.value
  start = time.time()
  with rules.activate(mesh):
    compiled = _traced_step(small, mesh, b, t).lower().compile()
  mem = compiled.memory_analysis()
  return (f"Compiled the same step for 4 layers (3 dense, 1 MoE; 671B widths), batch {b} x {t}, on "
          f"{mesh_cfg.size} simulated CPU devices ({dict(zip(AXES, mesh_cfg.shape))}) in "
          f"{time.time() - start:.1f} s; XLA per device: arguments {mem.argument_size_in_bytes / GB:.1f} GB, "
          f"outputs {mem.output_size_in_bytes / GB:.1f} GB, temporaries {mem.temp_size_in_bytes / GB:.1f} GB.")


def markdown(rows: list[dict]) -> str:
  cols = list(rows[0])
  fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  return "\n".join(lines + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


def which_fits(cfg, rows: list[dict], meshes: list[MeshConfig]) -> str:
  """The report's reading of the table: every figure from this run's rows and configs."""
  hbm, seq = _HBM_GB.value, _SEQ_LEN.value
  fits = sorted((i for i, r in enumerate(rows) if r["fits"] == "yes"), key=lambda i: -meshes[i].batch_shards)
  misses = [r for r in rows if r["fits"] == "no"]
  text = [f"**Which mesh fits (this run):** {'none' if not fits else f'{len(fits)} of {len(rows)}'}."]
  if misses:
    worst = misses[0]
    text.append(f"{', '.join(f'`{r['mesh']}`' for r in misses)} do not fit {seq} tokens per sequence (in "
                f"`{worst['mesh']}` the block inputs alone take {worst['= ckpt']:.1f} GB and the logits "
                f"{worst['+ logits']:.1f} GB per GPU).")
  if fits:
    best, mesh = rows[fits[0]], meshes[fits[0]]
    state = best["params"] + best["grads"] + best["adamw"]
    text.append(f"Of those that fit, `{best['mesh']}` holds the most sequences per step ({mesh.batch_shards}): it "
                f"needs {best['total']:.1f} GB of the {hbm:g} GB, {state:.1f} GB of state and {best['act (est.)']:.1f} "
                f"GB of estimated activations, leaving {hbm - best['total']:.1f} GB for XLA's buffers, the "
                f"all-to-all buffers and fragmentation.")
    text += [f"`{rows[i]['mesh']}` needs {rows[i]['total']:.1f} GB with {meshes[i].batch_shards} sequences per "
             "step." for i in fits[1:]]
    text.append(f"Put the expert axis across hosts (node-limited routing keeps each token on <= "
                f"{cfg.moe.topk_groups} nodes) and the context axis inside a host (its per-layer all-gather is "
                f"{best['+ keys'] * GB / 2**20:.0f} MiB at {seq} tokens and runs over NVLink).")
    tokens, d = seq // mesh.context, cfg.hidden_size
    buffer = lambda factor: mesh.expert * expert_parallel.capacity(tokens, cfg.moe.experts_per_token, mesh.expert,
                                                                   factor) * d * 2 / GB  # bf16 rows of D
    caveat = (f"Caveat: the CPU dispatch in `expert_parallel.py` pads the all-to-all to the dropless worst "
              f"case (every assignment of a GPU to one destination): at {tokens} tokens per GPU in "
              f"`{best['mesh']}` that is {buffer(None):.1f} GB per buffer (bf16), so on GPUs use `capacity_factor` "
              f"(1.25: {buffer(1.25):.1f} GB) or a ragged all-to-all (`jax.lax.ragged_all_to_all` is "
              f"UNIMPLEMENTED on XLA:CPU in jax 0.11.2, so it is not used or tested here).")
    text.append("\n\n" + textwrap.fill(caveat, 115))
  return textwrap.fill(" ".join(text[:-1] if fits else text), 115) + (text[-1] if fits else "")


def main(argv):
  del argv
  path = cli.output_path(_OUT.value, "memory_plan", "memory_plan.md")
  cfg = config.v3_2_671b()
  meshes = [parse_mesh(m) for m in _MESHES.value]
  rows = [plan_row(cfg, m) for m in meshes]
  fitting = [m for m, r in zip(meshes, rows) if r["fits"] == "yes"]
  lowering = lower_step(cfg, fitting[0] if fitting else meshes[-1])
  if _CPU_MESH.value:
    lowering += "\n\n" + compile_on_cpu(cfg, parse_mesh(_CPU_MESH.value))
  params = functional.count_params(functional.abstract_state(cfg))
  report = _REPORT.format(
      command=" ".join(["python -m experiments.memory_plan", *sys.argv[1:]]), hbm=f"{_HBM_GB.value:g}",
      params=params / 1e9, tb=4 * params / 1e12, seq=_SEQ_LEN.value, which_fits=which_fits(cfg, rows, meshes),
      table=markdown(rows), lowering=lowering)
  print(report)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(report)
  print(f"wrote {path}")


_REPORT = """# 671B memory plan ({hbm} GB per GPU)

Written by `{command}` (CPU, abstract arrays: nothing is allocated).

`experiments/memory_plan.py` shards the `v3_2_671b` state (`functional.abstract_state`) over candidate meshes
with the one rule table of `dsa_jax/sharding/rules.py`, and prints per-GPU gigabytes (1 GB = 1e9 bytes):

* **params** - the model state as `param_dtype` says: float32 master weights ({params:.1f}B parameters incl. the
  MTP block = {tb:.2f} TB), sharded ZeRO-3 over `fsdp x context x expert` and routed experts over `expert`;
  exact, from `NamedSharding.shard_shape` on an `AbstractMesh`.
* **grads** - the same shapes and shardings as the parameters (float32).
* **adamw** - the sparse stage's optimizer (`training.optimizer.build(..., "sparse")`: AdamW mu and nu in
  float32 for both groups), sharded like the parameters via `partition.shardings_like`; exact.
* **act (est.)** - an *analytic estimate* (`sharding.memory.activation_bytes`) for one {seq}-token sequence
  per batch shard (batch shards = data x fsdp x expert; each GPU holds 1 / context of its tokens): `ckpt`
  block inputs saved for the backward (per-block rematerialisation), `layer` the working set of one block
  recomputed and differentiated, `keys` the context-parallel all-gather of the 576-dim latent and the
  128-dim indexer key (bf16), `logits` float32 logits and their gradient (vocab split over `tensor`).
  It assumes fused indexer / sparse-MLA kernels (the [T, S] scores and the [T, K, 576] gathered keys are
  never materialised) and a ragged (unpadded) all-to-all. It is not a measurement: XLA's real peak is known
  only after compiling for the GPUs.

{which_fits}

The Pallas kernels (indexer, top-k, sparse MLA, grouped matmul) are not yet wrapped in `shard_map`; under
GSPMD on GPUs they would see gathered inputs. The lowering and the CPU compile below use the XLA reference
implementations, so the CPU compile's sizes are not a GPU prediction (they include the reference sparse
MLA's gathered keys and `jax.lax.ragged_dot` over all experts); the real peak needs the GPUs and the kernels.

{table}

{lowering}
"""


if __name__ == "__main__":
  cli.run(main)
