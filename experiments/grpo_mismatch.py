"""Sampler/trainer mismatch study (DeepSeek-V3.2 §3.1): bf16 sampler, fp32 trainer, stabilisers on/off.

  python -m experiments.grpo_mismatch                                   # -> /tmp/dsa_jax/grpo_mismatch/<time>/
  python -m experiments.grpo_mismatch --out=docs/reports/grpo_mismatch.md --overwrite  # the committed report

From one warm-started tiny MoE DSA model, runs a few GRPO steps per setting and tabulates, averaged over
the steps: |log μ − log π_θ| (mean, max), route agreement (sampler experts the trainer's router would also
pick), the fraction of sequences dropped by the off-policy mask (all had Â < 0), the trainer's probability
mass on the kept set, and the mean reward. Every number in the written table is measured by this script.
"""

import sys
import textwrap
import time

import numpy as np
from absl import flags, logging

from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.model import functional
from dsa_jax.progress import Progress
from dsa_jax.rl import get_task, grpo_step, loop, warm_start
from dsa_jax.sampling import SamplingConfig
from experiments import cli
from experiments.configs import grpo_demo

_OUT = flags.DEFINE_string("out", "", "Markdown output (default: a new /tmp/dsa_jax/grpo_mismatch/<time>/"
                            "grpo_mismatch.md; an existing file only with --overwrite).")
_STEPS = flags.DEFINE_integer("steps", 8, "GRPO steps per setting.", lower_bound=1)
_WARM_STEPS = flags.DEFINE_integer("warm_steps", 60, "Supervised warm-start steps.", lower_bound=1)
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Sampling top-p (so that the kept set truncates).",
                            lower_bound=0.0, upper_bound=1.0)
_DELTA = flags.DEFINE_float("delta", 0.05, "Off-policy mask threshold δ (small, so the mask can fire).",
                            lower_bound=0.0)

SETTINGS = (  # (name, sampler dtype, keep routing, keep sampling mask)
    ("fp32 sampler, both on", None, True, True),
    ("bf16 sampler, both on", "bfloat16", True, True),
    ("bf16, Keep Routing off", "bfloat16", False, True),
    ("bf16, Keep Sampling Mask off", "bfloat16", True, False),
    ("bf16, both off", "bfloat16", False, False),
)
MIN_LEN, MAX_LEN = 3, 4  # digits to sort
COLUMNS = ("logp_diff_mean", "logp_diff_max", "route_agreement", "masked_frac_neg_adv", "kept_mass", "reward")


def main(argv):
  del argv
  out = cli.output_path(_OUT.value, "grpo_mismatch", "grpo_mismatch.md")
  logging.set_verbosity(logging.WARNING)
  tokenizer = ByteTokenizer()
  cfg = grpo_demo.model_config(tokenizer.vocab_size)
  task = get_task("sort", min_len=MIN_LEN, max_len=MAX_LEN)
  params, _ = warm_start.warm_start(cfg, functional.init(cfg, 0), task, tokenizer, steps=_WARM_STEPS.value,
                                    batch_size=64, learning_rate=6e-3, prompt_width=10, completion_width=5, seed=0)
  sampling = SamplingConfig(max_new_tokens=5, top_p=_TOP_P.value, k_max=64, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)
  rows = []
  progress = Progress(len(SETTINGS) * _STEPS.value, "grpo_mismatch", every=max(1, _STEPS.value // 2))
  for setting, (name, dtype, keep_routing, keep_mask) in enumerate(SETTINGS):
    start = time.perf_counter()
    lcfg = loop.LoopConfig(steps=_STEPS.value, num_prompts=8, group_size=8, prompt_width=10, learning_rate=1e-3,
                           sampler_dtype=dtype)
    gcfg = grpo_step.GRPOConfig(delta=_DELTA.value, keep_routing=keep_routing, keep_sampling_mask=keep_mask)
    state = grpo_step.init_state(params, loop.optimizer(lcfg.learning_rate), 0)
    log = lambda m, done=setting * _STEPS.value, name=name: progress.update(done + m["step"], name)
    _, history = loop.train(cfg, lcfg, gcfg, sampling, task, tokenizer, state, log=log)
    rows.append((name, {k: float(np.mean([m[k] for m in history])) for k in COLUMNS}))
    progress.close()
    print(f"{name}: {rows[-1][1]} ({time.perf_counter() - start:.0f}s)", flush=True)
  table = ["| setting | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  table += [f"| {name} | " + " | ".join(f"{v[k]:.4g}" for k in COLUMNS) + " |" for name, v in rows]
  out.parent.mkdir(parents=True, exist_ok=True)
  command = " ".join(["python -m experiments.grpo_mismatch", *sys.argv[1:]])
  out.write_text(_REPORT.format(
      command=command, layers=cfg.num_layers, moe_layers=sum(map(cfg.is_moe_layer, range(cfg.num_layers))),
      experts=cfg.moe.num_experts, active=cfg.moe.experts_per_token, topk=cfg.indexer.topk, min_len=MIN_LEN,
      max_len=MAX_LEN, steps=_STEPS.value, prompts=lcfg.num_prompts, group=lcfg.group_size, top_p=_TOP_P.value,
      delta=_DELTA.value, table="\n".join(table), reading=reading(dict(rows), _DELTA.value)))
  print("\n".join(table))
  print(f"wrote {out}")


def reading(rows: dict[str, dict[str, float]], delta: float) -> str:
  """The report's reading of the table, every figure taken from `rows` (this run's means, by setting name)."""
  fp32, on, no_routing, no_mask = (rows[name] for name, *_ in SETTINGS[:4])
  text = (
      f"Reading (this run): with an fp32 sampler the trainer's log-probs differ from the sampler's by at most "
      f"{fp32['logp_diff_max']:.2g} nats and the off-policy mask drops {fp32['masked_frac_neg_adv']:.1%} of the "
      f"sequences. A bf16 sampler of the same parameters gives a mean gap of {on['logp_diff_mean']:.2g} nats per "
      f"token, at most {on['logp_diff_max']:.2g}; in this tiny model the trainer's router picks "
      f"{1 - on['route_agreement']:.2%} of the sampler's experts differently, and with Keep Routing off the mean gap "
      f"is {no_routing['logp_diff_mean']:.2g} (max {no_routing['logp_diff_max']:.2g}) against "
      f"{on['logp_diff_mean']:.2g} (max {on['logp_diff_max']:.2g}) with it on; how often routes flip in larger "
      f"models with many more experts is not measured here. Without Keep Sampling Mask the trainer's log-prob "
      f"includes the probability outside the top-p set that the sampler never drew from: the mean gap is "
      f"{no_mask['logp_diff_mean'] / on['logp_diff_mean']:.1f} times that with it (−log of the mean kept mass: "
      f"{-np.log(no_mask['kept_mass']):.2g}), and with δ = {delta} the off-policy mask drops "
      f"{no_mask['masked_frac_neg_adv']:.1%} of the sequences instead of {on['masked_frac_neg_adv']:.1%}. Few "
      f"steps, one seed: read differences between rows, not third digits.")
  return textwrap.fill(text, 110)


_REPORT = """# Sampler/trainer mismatch in GRPO (DeepSeek-V3.2 §3.1)

Written by `{command}` (CPU).
A tiny MoE DSA model ({layers} layers, {moe_layers} MoE layers of {experts} experts with {active} active, indexer
top-{topk}) is warm-started on digit sorting ({min_len}–{max_len} digits) with a short supervised run, then each
setting runs {steps} GRPO steps ({prompts} prompts × {group} samples, top-p {top_p}, δ = {delta}) from that same start.
The sampler runs the same parameters in the stated compute dtype; the trainer is fp32.
Columns are means over the steps:

- `logp_diff_mean` / `logp_diff_max`: |log μ(o_t) − log π_θ(o_t)| over generated tokens, μ the sampler's
  recorded log-prob (over its kept set) and π_θ the trainer's, with Keep Sampling Mask renormalised over
  the same set, without it the full softmax;
- `route_agreement`: fraction of the sampler's experts that the trainer's own router also selects;
- `masked_frac_neg_adv`: fraction of sequences dropped by the off-policy sequence mask (all have Â < 0);
- `kept_mass`: trainer probability mass on the sampler's kept set;
- `reward`: mean task reward of the rollouts.

{table}

{reading}
"""


if __name__ == "__main__":
  cli.run(main)
