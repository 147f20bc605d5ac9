"""Long-context study (issue 24): does DSA keep the dense model's retrieval and long-range LM loss?

  python -m experiments.long_context_study --preset=cpu_smoke   # CPU, a minute or two: every part, end to end
  python -m experiments.long_context_study --preset=gpu         # one H100 or H200, ~10 min by the estimate below
  python -m experiments.long_context_study --preset=gpu --run_dir=DIR  # resume or chain runs (finished stages skip)

(a) trains a dense model on text mixed with retrieval examples (`dsa_jax.data.retrieval`: single- and multi-hop
lookups among up to 16 pairs, a curriculum of example lengths) to a checkpoint; (b) from that checkpoint continues
it dense and runs the indexer warm-up + sparse training for the same tokens on the same batches
(`dsa_jax.training.recipe`: stages dense, dense_cont, warmup, sparse); (c) evaluates the dense continuation with
dense attention and the DSA model with sparse attention (`dsa_jax.evaluation.study`): results.json, grid.png,
topk.png, loss.png and summary.md (every number computed) in /tmp/dsa_jax/long_context_study/<time>/, or in --out
(an existing directory only with --overwrite). Checkpoints go to <out>/run unless --run_dir.

GPU preset design (not yet run; the lead's GPU run decides). Measured anchor: the parity run's `small` model (12
layers, width 1024, 32 experts) at 8K tokens, batch 1, steps in 0.233 s dense / 0.167 s warm-up / 0.215 s sparse
on one H200 (docs/reports/dsa_parity.md), with ~390 s of its 455 s spent compiling and evaluating.
- Model: the same with 4 layers (1 dense + 3 MoE; induction-style lookups need two attention layers, more buy
  depth we cannot train in minutes), vocabulary 512 (byte tokenizer: 3-letter keys and 3-digit values are 3
  tokens each), indexer 16 x 64, top-512. Its FLOPs per token are 0.34x the anchor's in each stage
  (`dsa_jax/training/flops.py`), so ~0.08 s a dense step of one 8K row, ~0.16-0.18 s at batch 2 (16K tokens),
  with a third of the layers to compile.
- Data: half the rows retrieval (rate 0.5), mixtures of 1-2 hops among 1-16 pairs with needles anywhere
  (max_depth 1.0); examples of 512 tokens (16 per row) for the first 250 steps, 2048 to step 500, then 8192:
  short examples give many lookups per step while the copy mechanism forms, and the row shape never changes.
- Steps: dense 800 (13M tokens, ~140 s), then dense continuation 240 = warm-up 40 + sparse 200 (~90 s both
  branches); lr 1e-3 and router gamma 1e-2 as in the parity run. About 4 min of steps, ~2 min of compiling, ~3
  min of evaluation (grid 4 lengths x 11 depths x 5 (pairs, hops) cells x 8 examples per model, top-k sweep at
  8K over k = 32, 64, 128, 256, 512 and all keys, 50 held-out batches per model). If it runs over the 10-minute
  limit, rerun with the same --run_dir: finished stages are skipped and only the evaluation repeats.
- Documents up to 8192 tokens (`max_doc_tokens`; many standard-library files are longer), so held-out rows have
  text at every position and the loss by position reaches the far end.
- Lengths: 16K and 32K are within the model's YaRN range (max_position 32768) but outside its training length;
  add them with --lengths=1024,2048,4096,8192,16384 when the budget allows.
"""

import dataclasses
import json
import shlex
import sys
import time

from absl import flags, logging

from dsa_jax.data import pipeline
from dsa_jax.evaluation import long_context, plots, study
from dsa_jax.training import recipe
from experiments import cli
from experiments.configs import train_small, train_tiny

_PRESET = flags.DEFINE_enum("preset", "cpu_smoke", ["cpu_smoke", "gpu"], "Model, data, steps and grid.")
_OUT = flags.DEFINE_string("out", "", "Output directory (default: a new /tmp/dsa_jax/long_context_study/<time>/; an "
                           "existing one only with --overwrite).")
_RUN_DIR = flags.DEFINE_string("run_dir", "", "Where the recipe's checkpoints go (default: <out>/run); a rerun "
                               "with the same one resumes it.")
_LENGTHS = flags.DEFINE_list("lengths", [], "Grid context lengths (default: the preset's).")


def cpu_smoke() -> tuple[dict, study.StudyConfig]:
  """The tiny model on 128-token rows, a few steps of each stage, a grid at the row length (its compiled forward
  is reused): checks the pipeline end to end, not the result."""
  config = train_tiny.get_config()
  config.model.update({"num_layers": 2, "num_mtp_layers": 0})
  config.model.indexer.topk = 16
  config.loss.mtp_weight = 0.0
  config.data.update({"seq_len": 128, "batch_size": 2})
  config.data.retrieval.update({"rate": 0.5, "num_pairs": 2, "hops": 2, "vary": True, "digits": 2, "key_letters": 2,
                                "max_depth": 1.0, "lengths": (96, 128), "length_steps": (0, 3)})
  config.train.update({"dense_steps": 6, "warmup_steps": 2, "sparse_steps": 4, "checkpoint_every": 0, "log_every": 2,
                       "eval_batches": 1, "eval_examples": 2, "export_hf": False})
  grid = long_context.GridConfig(lengths=(128,), depths=(0.0, 1.0), pairs=(1, 2), hops=(1, 2), examples=2,
                                 batch_size=2, digits=2, key_letters=2)
  return config.to_dict(), study.StudyConfig(grid=grid, ks=(16,), heldout_batches=2, buckets=4)


def gpu() -> tuple[dict, study.StudyConfig]:
  """The design in the module docstring."""
  config = train_small.get_config()
  config.model.num_layers = 4
  config.data.update({"seq_len": 8192, "batch_size": 2, "max_doc_tokens": 8192})
  config.data.retrieval.update({"rate": 0.5, "num_pairs": 16, "hops": 2, "vary": True, "digits": 3, "key_letters": 3,
                                "max_depth": 1.0, "lengths": (512, 2048, 8192), "length_steps": (0, 250, 500)})
  config.train.update({"dense_steps": 800, "warmup_steps": 40, "sparse_steps": 200, "checkpoint_every": 400,
                       "log_every": 50, "eval_every": 0, "eval_batches": 1, "eval_examples": 8, "export_hf": False})
  return config.to_dict(), study.StudyConfig()


PRESETS = {"cpu_smoke": cpu_smoke, "gpu": gpu}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  out = cli.output_path(_OUT.value, "long_context_study", "")  # --out: a directory, replaced only with --overwrite
  out.mkdir(parents=True, exist_ok=True)
  tree, study_cfg = PRESETS[_PRESET.value]()
  if _LENGTHS.value:
    grid = dataclasses.replace(study_cfg.grid, lengths=tuple(cli.positive_ints(_LENGTHS)))
    study_cfg = dataclasses.replace(study_cfg, grid=grid)
  with cli.user_errors():
    cfg = recipe.RecipeConfig.from_config({**tree, "run_dir": _RUN_DIR.value or str(out / "run")})
  print(f"output directory: {out}", flush=True)
  started = time.perf_counter()
  done = recipe.run_with_states(cfg)
  if done is None:
    sys.exit(143)  # SIGTERM: checkpoint saved; rerun with --run_dir to resume
  train_results, states = done
  trained = time.perf_counter() - started
  tokenizer = pipeline.build_tokenizer(cfg.data)
  _, eval_docs = pipeline.documents(cfg.data)
  batches = pipeline.eval_batches(cfg.data, eval_docs, tokenizer, study_cfg.heldout_batches)
  results = study.evaluate(cfg.model, {"dense": states["dense_cont"], "DSA": states["sparse"]}, eval_docs, tokenizer,
                           batches, study_cfg, cfg.implementation)
  results.update({"preset": _PRESET.value, "train_seconds": trained, "recipe": train_results})
  (out / "results.json").write_text(json.dumps(results, indent=1))
  images = {"grid": plots.grid_heatmaps(results["grid"], out / "grid.png").name,
            "topk": plots.topk_curve(results["topk_sweep"], out / "topk.png").name,
            "loss": plots.loss_by_position(results["heldout"], out / "loss.png").name}
  setup = {"preset": _PRESET.value, "model": f"{cfg.model.num_layers} layers, width {cfg.model.hidden_size}, "
           f"top-{cfg.model.indexer.topk}", "rows": f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens",
           "retrieval data": str(dataclasses.asdict(cfg.data.retrieval)),
           "steps": f"dense {cfg.dense_steps}; dense continuation {cfg.warmup_steps + cfg.sparse_steps}; warm-up "
                    f"{cfg.warmup_steps} + sparse {cfg.sparse_steps}",
           "grid": str(dataclasses.asdict(study_cfg.grid)), "training time (s)": f"{trained:.0f}",
           "evaluation time (s)": ", ".join(f"{k} {v:.0f}" for k, v in results["eval_seconds"].items())}
  command = "python -m experiments.long_context_study " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  (out / "summary.md").write_text(study.markdown(results, setup, images, command))
  print(f"results.json, summary.md and plots in {out}", flush=True)


if __name__ == "__main__":
  cli.run(main)
