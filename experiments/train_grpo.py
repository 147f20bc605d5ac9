"""GRPO with DeepSeek-V3.2's stabilisers on digit sorting, with a tiny MoE DSA model on CPU (issue 7).

  python -m experiments.train_grpo --out=/tmp/dsa_jax/grpo_sort

A short supervised warm start (teacher forcing on correct answers, plus the indexer's dense KL) teaches the
random model the answer format but not yet sorting (mean reward <= 0.3, about what right-length random digits
score); GRPO (`dsa_jax.rl.loop`) then raises it above 0.8. Defaults and the measured curve: docs/reports/grpo_demo.md.
Prints the curve as a table, writes `curve.png`, `curve.json`, `metrics.jsonl`, Orbax checkpoints and
(`--export_hf`) the final model with its tokenizer as an HF checkpoint `hf/` under --out
(`python -m experiments.generate --run_dir=OUT`). Rerunning with the same --out resumes (a longer --steps
continues the run; the curve covers every step, read back from `metrics.jsonl`); with other settings it stops,
naming them; --overwrite sets the earlier run aside (`--out/set_aside/<n>/`) and starts over.
"""

import json
import pathlib
import sys
import time

import numpy as np
from absl import flags, logging

import dsa_jax
from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.model import functional
from dsa_jax.progress import Progress
from dsa_jax.rl import get_task, grpo_step, loop, warm_start
from dsa_jax.sampling import SamplingConfig
from dsa_jax.training import checkpointing, run_dir
from dsa_jax.training.loop import NonFiniteError
from experiments import cli
from experiments.configs import grpo_demo

_OUT = flags.DEFINE_string("out", "/tmp/dsa_jax/grpo_sort", "Output directory (plot, curve, checkpoints).")
_TASK = flags.DEFINE_string("task", "sort", "Task name (dsa_jax.rl.task_names()).")
_MIN_LEN = flags.DEFINE_integer("min_len", 3, "Shortest digit string.", lower_bound=1)
_MAX_LEN = flags.DEFINE_integer("max_len", 3, "Longest digit string.", lower_bound=1)
_WARM_STEPS = flags.DEFINE_integer("warm_steps", 25, "Supervised warm-start steps.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 400, "GRPO steps (one rollout batch each).", lower_bound=1)
_PROMPTS = flags.DEFINE_integer("num_prompts", 64, "Prompts per step.", lower_bound=1)
_GROUP = flags.DEFINE_integer("group_size", 8, "Completions per prompt (G).", lower_bound=1)
_LR = flags.DEFINE_float("lr", 1e-3, "GRPO learning rate.", lower_bound=0.0)
_WARM_LR = flags.DEFINE_float("warm_lr", 6e-3, "Warm-start learning rate.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sampling top-p.", lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_BETA = flags.DEFINE_float("beta", 0.01, "KL weight beta (GRPOConfig's default).", lower_bound=0.0)
_WARM_KL = flags.DEFINE_float("warm_indexer_kl", 1.0, "Weight of the indexer's dense KL in the warm start.")
_TOPK = flags.DEFINE_integer("index_topk", 8, "Indexer top-k (< 9 prompt tokens: sparse on every completion token).",
                             lower_bound=1)
_UPDATES = flags.DEFINE_integer("updates_per_rollout", 1, "Updates per rollout batch.", lower_bound=1)
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", lower_bound=0.0)

LOG_EVERY = 10  # steps between progress lines when the output is not a terminal
_EXPORT_HF = flags.DEFINE_bool("export_hf", True, "Write the final model and tokenizer to <out>/hf (HF format).")
# The settings a rerun in the same --out must keep (--steps may grow: a resume).
_IDENTITY = (_TASK, _MIN_LEN, _MAX_LEN, _WARM_STEPS, _PROMPTS, _GROUP, _LR, _WARM_LR, _TOP_P, _SEED, _BETA, _WARM_KL,
             _TOPK, _UPDATES, _TEMP)


def print_table(history: list[dict]) -> None:
  keys = ("step", "reward", "exact", "logp_diff_max", "kl", "ratio_min", "ratio_max", "masked_frac_neg_adv",
          "kept_mass", "route_agreement", "seconds")
  print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
  for m in history:
    print("| " + " | ".join(f"{m[k]:.4g}" for k in keys) + " |")


def save_plot(history: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  steps = [m["step"] for m in history]
  ax.plot(steps, [m["reward"] for m in history], label="mean reward")
  ax.plot(steps, [m["exact"] for m in history], label="exact-answer rate")
  ax.set_xlabel("GRPO step")
  ax.set_ylim(0, 1)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  out = pathlib.Path(_OUT.value)
  try:
    run(out)
  except (run_dir.RunConfigError, checkpointing.CheckpointError, NonFiniteError) as err:
    sys.exit(f"train_grpo: {err}")


def run(out: pathlib.Path) -> None:
  run_dir.remember(out, {f.name: f.value for f in _IDENTITY}, restart=flags.FLAGS.overwrite,
                   restart_flag="--overwrite")
  tokenizer = ByteTokenizer()
  cfg = grpo_demo.model_config(tokenizer.vocab_size, index_topk=_TOPK.value)
  task = get_task(_TASK.value, min_len=_MIN_LEN.value, max_len=_MAX_LEN.value)
  prompt_width = len(_TASK.value) + _MAX_LEN.value + 2
  start = time.perf_counter()
  params, losses = warm_start.warm_start(
      cfg, functional.init(cfg, _SEED.value), task, tokenizer, steps=_WARM_STEPS.value, batch_size=64,
      learning_rate=_WARM_LR.value, prompt_width=prompt_width, completion_width=_MAX_LEN.value + 1, seed=_SEED.value,
      indexer_kl_weight=_WARM_KL.value)
  print(f"warm start: {_WARM_STEPS.value} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"{time.perf_counter() - start:.1f}s")
  lcfg = loop.LoopConfig(steps=_STEPS.value, num_prompts=_PROMPTS.value, group_size=_GROUP.value,
                         prompt_width=prompt_width, learning_rate=_LR.value, seed=_SEED.value, checkpoint_every=20,
                         updates_per_rollout=_UPDATES.value)
  sampling = SamplingConfig(max_new_tokens=_MAX_LEN.value + 1, top_p=_TOP_P.value, temperature=_TEMP.value,
                            k_max=64, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  state = grpo_step.init_state(params, loop.optimizer(lcfg.learning_rate), _SEED.value)
  progress = Progress(_STEPS.value, "grpo", every=LOG_EVERY)
  log = lambda m: progress.update(m["step"], f"reward {m['reward']:.3f} exact {m['exact']:.3f} kl {m['kl']:.4f} "
                                             f"{m['seconds']:.2f}s/step")
  gcfg = grpo_step.GRPOConfig(beta=_BETA.value, temperature=_TEMP.value)
  state, history = loop.train(cfg, lcfg, gcfg, sampling, task, tokenizer, state, run_dir=str(out), log=log)
  progress.close()
  print(f"total {time.perf_counter() - start:.1f}s")
  print_table(history[::max(1, len(history) // 20)] + history[-1:])
  (out / "curve.json").write_text(json.dumps(history))
  save_plot(history, out / "curve.png")
  if _EXPORT_HF.value:
    dsa_jax.save_hf(out / "hf", cfg, state.params, tokenizer=tokenizer)
    print(f"HF checkpoint of the final model: {out / 'hf'}")
  if history:
    first, last = np.mean([m["reward"] for m in history[:10]]), np.mean([m["reward"] for m in history[-10:]])
    print(f"mean reward, first 10 steps {first:.3f}, last 10 steps {last:.3f}")


if __name__ == "__main__":
  cli.run(main)
