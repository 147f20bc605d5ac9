"""Where the device time of one benchmarked computation goes: a profiler trace of a few calls, summed per op.

  python -m experiments.profile_kernels --target=index_topk --seq_len=131072
  python -m experiments.profile_kernels --target=dsa_core --seq_len=131072 --trace_dir=$OUT/trace

Targets (the inputs of the benchmark sections, default implementations): "topk" (the default top-k of 1024 rows
of causal indexer scores, `pallas_kernels/topk/bench.py`), "index_topk" (scores + top-k of a causal sequence),
"dsa_core" (the DSA attention core: index_topk + sparse MLA, `pallas_kernels/benchmarking/dsa_core.py`), and
"train_step" (one training step of `--stage` with the model of `--train_config`, by default the parity run's
`train_small`, on one row of `--seq_len` random tokens). After one warm-up call (compilation), `--iters` calls
are traced with `jax.profiler` (a Perfetto trace); the table (`dsa_jax.profiling`) sums each op's time on the
device streams (on a machine without an accelerator, on the host) and divides by the calls: ms per call, share,
count per call. Without a GPU it stops at once, unless `--allow_cpu` (a check of the XLA paths at small T).
"""

import tempfile

import jax
from absl import flags

from dsa_jax import profiling
from experiments import cli
from pallas_kernels.benchmarking import dsa_core
from pallas_kernels.topk import api as topk_api
from pallas_kernels.topk import bench as topk_bench

TARGETS = ("topk", "index_topk", "dsa_core", "train_step")
_TARGET = flags.DEFINE_enum("target", "index_topk", TARGETS, "What to profile.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "Sequence length T (keys per row).", lower_bound=1)
_ITERS = flags.DEFINE_integer("iters", 3, "Traced calls.", lower_bound=1)
_TOP = flags.DEFINE_integer("top", 25, "Ops listed.", lower_bound=1)
_TRACE_DIR = flags.DEFINE_string("trace_dir", "", "Keep the trace here (default: a temporary folder).")
_STAGE = flags.DEFINE_enum("stage", "sparse", ("dense", "warmup", "sparse"), "Stage of --target=train_step.")
_TRAIN_CONFIG = flags.DEFINE_enum("train_config", "train_small", ("train_small", "train_tiny"),
                                  "Config file (experiments/configs) of --target=train_step.")
_ALLOW_CPU = flags.DEFINE_bool("allow_cpu", False, "Run without a GPU (tests: the XLA paths at small T).")


def _train_step(stage: str, seq_len: int, config_name: str):
  """One step of `stage` for the config's model on a random row -> (step function, (state, batch))."""
  import importlib  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415

  from dsa_jax.training import optimizer, recipe, state as state_lib, train_step  # noqa: PLC0415

  c = importlib.import_module(f"experiments.configs.{config_name}").get_config()
  c.data.seq_len = seq_len
  cfg = recipe.RecipeConfig.from_config(c)
  step_cfg = train_step.StepConfig(model=cfg.model, stage=stage, optimizer=cfg.optimizer, loss=cfg.loss,
                                   bias_gamma=cfg.bias_gamma)
  state = state_lib.start_stage(recipe.initial_state(cfg), optimizer.build(cfg.optimizer, stage))
  ids = np.random.default_rng(0).integers(0, 256, (1, seq_len), dtype=np.int32)
  batch = dict(ids=ids, positions=np.arange(seq_len, dtype=np.int32)[None], segment_ids=np.zeros_like(ids),
               loss_mask=np.ones_like(ids))
  # Not donated, so that every traced call can reuse the same state.
  return jax.jit(lambda state, batch: train_step.step(state, batch, config=step_cfg)), (state, batch)


def build(target: str, seq_len: int):
  """-> (jitted function, its arguments) for `target` at `seq_len`."""
  if target == "train_step":
    return _train_step(_STAGE.value, seq_len, _TRAIN_CONFIG.value)
  if target == "topk":
    fn = lambda scores: topk_api.topk_indices(scores, topk_bench.TOPK)
    return jax.jit(fn), (topk_bench.score_rows(seq_len)["indexer"],)
  x, vis = dsa_core.inputs(seq_len)
  if target == "index_topk":
    from pallas_kernels.lightning_indexer import api as indexer_api  # noqa: PLC0415
    fn = lambda x, vis: indexer_api.index_topk(x["iq"], x["ik"], x["iw"], topk=dsa_core.K, **vis)
    return jax.jit(fn), (x, vis)
  return jax.jit(lambda x, vis: dsa_core.layer(x, vis, None)), (x, vis)


def main(argv):
  del argv
  cli.require_gpu("profile_kernels", _ALLOW_CPU.value)
  fn, args = build(_TARGET.value, _SEQ_LEN.value)
  jax.block_until_ready(fn(*args))  # compile outside the trace
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="profile_kernels_")
  trace = profiling.trace_calls(lambda: fn(*args), _ITERS.value, trace_dir)
  total, count, summed = profiling.op_times(trace)
  print(f"{_TARGET.value} at T={_SEQ_LEN.value} on {jax.devices()[0].device_kind}; {_ITERS.value} calls; "
        f"summed: {summed}; trace {trace}")
  print(profiling.table(total, count, _ITERS.value, _TOP.value))


if __name__ == "__main__":
  cli.run(main)
