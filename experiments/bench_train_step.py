"""Whole training steps at DeepSeek-V3.2 layer shapes on one GPU: step time, tokens/s, memory, MFU, top ops.

  python -m experiments.bench_train_step                                    # 3 stages x 32K, 64K, 128K
  python -m experiments.bench_train_step --stages=sparse --seq_lens=131072 --remat=layer --q_chunk=32768
  python -m experiments.bench_train_step --allow_cpu --preset=tiny --seq_lens=256 --steps=1   # CPU check

Each (stage, T) is one row of T tokens (batch 1) through `train_step.step` as the library defines it
(forward, backward, AdamW update, donated state) for the `--preset` model with `--moe_layers` MoE layers
after its dense ones (`v3_2_layers`: the exact V3.2 layer shapes, 32 local experts), with `--remat` and
`--q_chunk` (`StepConfig.remat`, `StepConfig.q_chunk`: what fits 128K tokens). Each row runs in its own
process (this one never touches the device), so that everything is freed between rows and the device's
`peak_bytes_in_use` is that row's. Before
allocating anything the row compiles the step and reads the executable's `memory_analysis()`; a row that
would need more than `--max_gib` is skipped with a message. Otherwise it builds the state, runs one warm-up
step and `--steps` timed ones and, with `--profile`, traces one more (`dsa_jax.profiling`: the top 15 ops by
device time). MFU counts model FLOPs (`dsa_jax.training.flops`, the formula heads `benchmarks/train_step.md`)
against the device's bf16 data-sheet peak.

Each row is printed as it finishes and the JSON record (date, commit, device kind, exact command, rows) is
rewritten after every row under `--out_dir`, so a time-out leaves the rows done. Without a GPU it stops at
once with an error, unless `--allow_cpu` (tests: a tiny preset at small T).
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags

from dsa_jax import profiling
from dsa_jax.model import functional
from dsa_jax.model.config import preset
from dsa_jax.training import flops, memory_check, optimizer, train_step
from dsa_jax.training import state as state_lib
from experiments import cli, records

_STAGES = flags.DEFINE_list("stages", ["dense", "warmup", "sparse"], "Training stages (rows: stages x seq_lens).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "65536", "131072"], "Row lengths T (batch 1).")
_PRESET = flags.DEFINE_string("preset", "v3_2_layers", "Model preset (dsa_jax.model.config.PRESETS).")
_MOE_LAYERS = flags.DEFINE_integer("moe_layers", 1, "MoE layers after the preset's dense layers.",
                                  lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per row (after one warm-up step).",
                             lower_bound=1)
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/dsa_jax/bench_train_step", "Where the JSON record and traces go.")
_PROFILE = flags.DEFINE_bool("profile", True, "Trace one more step and list its top 15 ops by device time.")
_REMAT = flags.DEFINE_enum("remat", "layer", ["none", "layer", "layer_save_dots"],
                           "Rematerialisation of the layers (dsa_jax.model.transformer.REMAT_POLICIES).")
_Q_CHUNK = flags.DEFINE_integer("q_chunk", 16384, "Attention queries per chunk (dsa_jax.model.mla) on rows longer "
                                "than this; 0: all queries at once.", lower_bound=0)
_MAX_GIB = flags.DEFINE_float("max_gib", 75.0, "Skip a row whose compiled step needs more device memory (GiB).",
                              lower_bound=0.0)
_ALLOW_CPU = flags.DEFINE_bool("allow_cpu", False, "Run without a GPU (tests, with a tiny preset).")
_ROW = flags.DEFINE_string("row", "", "Internal: measure one row 'stage:T' in this process.")
_ROW_OUT = flags.DEFINE_string("row_out", "", "Internal: where --row writes its result (JSON).")

GIB = 2**30
WARMUP_STEPS = 1
TOP_OPS = 15
NO_GPU = 3  # exit status of a row process that found no GPU


def model_config():
  cfg = preset(_PRESET.value)
  return cfg.replace(num_layers=cfg.first_k_dense + _MOE_LAYERS.value)


def random_row(vocab_size: int, seq_len: int):
  """One unpacked row of random tokens (numpy), every label counted."""
  ids = np.random.default_rng(0).integers(0, vocab_size, (1, seq_len), dtype=np.int32)
  return dict(ids=ids, positions=np.arange(seq_len, dtype=np.int32)[None], segment_ids=np.zeros_like(ids),
              loss_mask=np.ones_like(ids))


def memory_estimate(compiled) -> dict:
  """GiB of the compiled step by XLA's memory analysis; `estimate_gib` = arguments + outputs - donated + temps
  (`memory_check.compiled_bytes`)."""
  m = compiled.memory_analysis()
  parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, donated=m.alias_size_in_bytes,
               temps=m.temp_size_in_bytes)
  return {"estimate_gib": memory_check.compiled_bytes(compiled) / GIB, **{f"{k}_gib": v / GIB for k, v in parts.items()}}


def measure(stage: str, seq_len: int) -> dict:
  """Compiles, checks the memory estimate, runs and profiles one row in this process."""
  cfg = model_config()
  # Query chunks hold a chunk's queries, outputs and their gradients: the sparse stage's absorbed queries and
  # latent outputs ([T, 128, 576] / [T, 128, 512]); in the dense stages the expanded MHA keys of the keys up to
  # the chunk's last query, and cuDNN's float32 dq accumulator of the chunk only.
  q_chunk = _Q_CHUNK.value if 0 < _Q_CHUNK.value < seq_len else 0
  config = train_step.StepConfig(model=cfg, stage=stage, remat=_REMAT.value, q_chunk=q_chunk)
  init = lambda: state_lib.create(cfg, functional.init(cfg, 0), optimizer.build(config.optimizer, stage), 0)
  host_batch = random_row(cfg.vocab_size, seq_len)
  row = dict(stage=stage, T=seq_len, preset=_PRESET.value, moe_layers=_MOE_LAYERS.value, remat=config.remat,
             q_chunk=q_chunk, device=jax.devices()[0].device_kind)
  start = time.perf_counter()
  compiled = train_step.step.lower(jax.eval_shape(init), host_batch, config=config).compile()
  row.update(compile_s=time.perf_counter() - start, **memory_estimate(compiled))
  if row["estimate_gib"] > _MAX_GIB.value:
    print(f"[{stage} T={seq_len}] skipped: the compiled step needs about {row['estimate_gib']:.1f} GiB > "
          f"--max_gib={_MAX_GIB.value:g}", flush=True)
    return {**row, "status": "skipped"}
  state, batch = jax.jit(init)(), jax.device_put(host_batch)
  metrics = None

  def one_step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)
    return state, metrics

  times = []
  for i in range(WARMUP_STEPS + _STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(one_step())
    if i >= WARMUP_STEPS:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  per_token = flops.per_token(cfg, seq_len, stage, config.with_mtp)
  peak, peak_source = flops.peak_flops()
  stats = jax.devices()[0].memory_stats() or {}
  row.update(status="ok", step_s=step_s, step_times_s=times, tokens_per_s=seq_len / step_s,
             flops_per_token=per_token, model_tflops_per_step=per_token * seq_len / 1e12,
             mfu=per_token * seq_len / step_s / peak, peak_flops=peak, peak_source=peak_source,
             peak_gib=stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None,
             loss=float(metrics["loss"]))
  if _PROFILE.value:
    trace = profiling.trace_calls(one_step, 1, pathlib.Path(_OUT_DIR.value) / "traces" / f"{stage}_{seq_len}")
    total, count, summed = profiling.op_times(trace)
    row.update(profiled=summed, profiled_ms=sum(total.values()) / 1e3, trace=str(trace),
               top_ops=profiling.top_ops(total, count, 1, TOP_OPS))
  return row


def run_row() -> None:
  """--row: one row in this process, its result written to --row_out."""
  if jax.default_backend() != "gpu" and not _ALLOW_CPU.value:
    print(f"error: bench_train_step times training steps on a GPU, but JAX's backend here is {jax.default_backend()!r}; "
          "run it on a GPU machine (or pass --allow_cpu for a CPU check).", file=sys.stderr, flush=True)
    sys.exit(NO_GPU)
  stage, seq_len = _ROW.value.split(":")
  try:
    row = measure(stage, int(seq_len))
  except Exception as err:  # noqa: BLE001 -- an out-of-memory or compile failure is this row's result
    row = dict(stage=stage, T=int(seq_len), status="failed", error=f"{type(err).__name__}: {str(err)[:1000]}")
  pathlib.Path(_ROW_OUT.value).write_text(json.dumps(row))


def row_line(row: dict) -> str:
  head = f"[{row['stage']} T={row['T']}] {row['status']}"
  if row["status"] == "failed":
    return f"{head}: {row.get('error', '')[:300]}"
  if row["status"] == "skipped":
    return f"{head}: estimate {row['estimate_gib']:.1f} GiB"
  peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
  lines = [f"{head}: step {row['step_s']:.3f} s, {row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%, "
           f"peak {peak} GiB (estimate {row['estimate_gib']:.1f}), compile {row['compile_s']:.0f} s, "
           f"loss {row['loss']:.3f}"]
  lines += [f"  {op['ms']:9.3f} ms {op['share']:6.1%} {op['count']:6.0f}x  {op['op'][:100]}"
            for op in row.get("top_ops", [])]
  return "\n".join(lines)


def main(argv):
  del argv  # the rows' processes get this one's flags (sys.argv)
  if _ROW.value:
    run_row()
    return
  seq_lens = cli.positive_ints(_SEQ_LENS)
  record = {**records.header("", " ".join(["python -m experiments.bench_train_step", *sys.argv[1:]])),
            "rows": []}
  # Each row's process takes most of the device memory at once (JAX's preallocation, 75% by default).
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.97", **os.environ}
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  path = None
  for seq_len in seq_lens:  # every stage at the first T before the next T
    for stage in _STAGES.value:
      row_out = out / f"row_{stage}_{seq_len}.json"
      row_out.unlink(missing_ok=True)
      done = subprocess.run([sys.executable, "-m", "experiments.bench_train_step", *sys.argv[1:],
                             f"--row={stage}:{seq_len}", f"--row_out={row_out}"], env=env, check=False)
      if done.returncode == NO_GPU:
        sys.exit(NO_GPU)
      row = json.loads(row_out.read_text()) if row_out.exists() else dict(
          stage=stage, T=seq_len, status="failed", error=f"the row's process exited with status {done.returncode}")
      record["device"] = record["device"] or row.get("device", "")
      record["rows"].append(row)
      path = records.write(_OUT_DIR.value, "train_step", record)
      print(row_line(row), flush=True)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
