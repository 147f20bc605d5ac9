"""The 671B memory plan: per-GPU bytes of parameters, gradients, AdamW state and 128K-token activations on
candidate H200 meshes (256 GPUs = 32 hosts x 8), from abstract arrays only; then one forward+backward of a
few 671B-sized layers cross-lowered for that mesh with abstract devices.

  python -m experiments.memory_plan                                 # -> /tmp/dsa_jax/memory_plan/<time>/
  python -m experiments.memory_plan --out=docs/reports/memory_plan.md --overwrite  # the committed report

It also compiles a few 671B-sized layers for 8 simulated CPU devices, to check that XLA partitions them.
"""

import os
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
_OUT = flags.DEFINE_string("out", "", "Where the markdown table goes (default: a new /tmp/dsa_jax/memory_plan/<time>/"
                           "memory_plan.md); an existing file only with --overwrite, and it keeps its prose.")

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


def markdown(rows: list[dict], lowering: str) -> str:
  cols = list(rows[0])
  fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n\n" + lowering + "\n"


def main(argv):
  del argv
  path = cli.output_path(_OUT.value, "memory_plan", "memory_plan.md")
  cfg = config.v3_2_671b()
  rows = [plan_row(cfg, parse_mesh(m)) for m in _MESHES.value]
  fitting = [parse_mesh(m) for m, r in zip(_MESHES.value, rows) if r["fits"] == "yes"]
  lowering = lower_step(cfg, fitting[0] if fitting else parse_mesh(_MESHES.value[-1]))
  if _CPU_MESH.value:
    lowering += "\n\n" + compile_on_cpu(cfg, parse_mesh(_CPU_MESH.value))
  table = markdown(rows, lowering)
  print(table)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = path.read_text() if path.exists() else ""
  marker = "<!-- memory_plan.py table -->"
  head, _, _ = text.partition(marker)
  path.write_text((head or "# 671B memory plan\n\n") + marker + "\n" + table)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
