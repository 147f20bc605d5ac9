"""Plots a DSA run from its per-stage `metrics.jsonl` files: LM loss of the dense and sparse branches,
the indexer KL, the top-k attention mass over training, and step times.

  python -m experiments.plot_dsa_run --run_dir=docs/reports/dsa_parity/run4   # -> /tmp/dsa_jax/plot_dsa_run/<time>/
  python -m experiments.plot_dsa_run --run_dir=docs/reports/dsa_parity/run4 --out=docs/reports/dsa_parity/run4.png
Files are `<stage>.jsonl` (as copied from a GPU run) or `<stage>/metrics.jsonl` (a run directory).
Several run directories (comma-separated; later ones win per stage) merge the parts of a run split with
`--config.train.stages`; when their `results.json` files together hold every stage, the summary table is
printed.

The sparse stage and the dense continuation read the same batches (sparse step j is dense_cont step
warm-up steps + j), and each step's LM loss is taken before the update on a batch seen for the first time, so
`paired_gap` compares the two branches batch by batch: a far tighter comparison than one held-out batch.
"""

import json
import pathlib

import matplotlib
import numpy as np
from absl import flags

from experiments import cli

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_RUN_DIR = flags.DEFINE_list("run_dir", None, "Run directories or folders of <stage>.jsonl files.", required=True)
_OUT = flags.DEFINE_string("out", "", "Output PNG (default: a new /tmp/dsa_jax/plot_dsa_run/<time>/dsa_run.png; an "
                            "existing file only with --overwrite).")
STAGES = ("dense", "warmup", "sparse", "dense_cont")


def load(run_dir: pathlib.Path) -> dict[str, list[dict]]:
  found = {}
  for stage in STAGES:
    for path in (run_dir / f"{stage}.jsonl", run_dir / stage / "metrics.jsonl"):
      if path.exists():
        found[stage] = [json.loads(line) for line in path.read_text().splitlines()]
  return found


def pairs(runs: dict[str, list[dict]]) -> list[tuple[int, float, float]]:
  """(sparse step, its LM loss, dense_cont's LM loss on the same batch) for every sparse step."""
  if "sparse" not in runs or "dense_cont" not in runs:
    return []
  offset = len([r for r in runs.get("warmup", []) if "loss" in r])
  dense = {r["step"]: r["lm_loss"] for r in runs["dense_cont"] if "lm_loss" in r}
  return [(r["step"], r["lm_loss"], dense[offset + r["step"]]) for r in runs["sparse"]
          if "lm_loss" in r and offset + r["step"] in dense]


def paired_gap(runs: dict[str, list[dict]], last: int | None = None) -> tuple[float, float, int] | None:
  """(mean relative LM-loss gap sparse / dense_cont - 1, its standard error, batches) over the sparse
  stage's last `last` steps (all when None), each sparse batch paired with the same dense_cont batch."""
  paired = pairs(runs)
  paired = paired[-last:] if last else paired
  if len(paired) < 2:
    return None
  _, sparse, base = np.array(paired).T
  diff = (sparse - base) / base.mean()
  return sparse.mean() / base.mean() - 1, diff.std(ddof=1) / np.sqrt(len(diff)), len(diff)


def main(argv):
  del argv
  out = cli.output_path(_OUT.value, "plot_dsa_run", "dsa_run.png")
  runs, results = {}, {}
  for run_dir in map(pathlib.Path, _RUN_DIR.value):
    if not run_dir.is_dir():
      raise cli.UserError(f"--run_dir={run_dir} is not a directory; allowed: run directories or folders of "
                          "<stage>.jsonl files.")
    runs.update(load(run_dir))
    if (run_dir / "results.json").exists():
      results.update(json.loads((run_dir / "results.json").read_text()))
  if all(stage in results for stage in ("dense", "warmup", "sparse")):
    from dsa_jax.training import recipe  # only the table needs the library
    summary = recipe.table(results)
    if "dense_cont" in results:  # issue 5's goal: the sparse model within 2% of the dense continuation
      gap = results["sparse"]["lm_loss"] / results["dense_cont"]["lm_loss"] - 1
      summary += f"\n\nDSA vs dense continuation, held-out LM loss: {100 * gap:+.2f}% (goal: within 2%)"
    n_sparse = len([r for r in runs.get("sparse", []) if "lm_loss" in r])
    for last in (None, n_sparse // 2):
      paired = paired_gap(runs, last)
      if paired is not None:
        summary += (f"\nDSA vs dense continuation, LM loss on the same {paired[2]} training batches (sparse "
                    f"stage{'' if last is None else ', last half'}): {100 * paired[0]:+.2f}% +- {100 * paired[1]:.2f}% (s.e.)")
    print(summary)
  fig, axes = plt.subplots(1, 5, figsize=(22, 3.6))
  trained = lambda stage: len([r for r in runs.get(stage, []) if "loss" in r])
  starts = {"dense": 0, "sparse": trained("dense") + trained("warmup"), "dense_cont": trained("dense")}
  for stage, start in starts.items():
    rows = [r for r in runs.get(stage, []) if "lm_loss" in r]
    axes[0].plot([start + r["step"] for r in rows], [r["lm_loss"] for r in rows], label=stage)
  axes[0].set(title="training LM loss", xlabel="step (all stages)")
  axes[0].legend()
  for stage in ("warmup", "sparse"):
    rows = [r for r in runs.get(stage, []) if "kl" in r]
    axes[1].plot([r["step"] for r in rows], [r["kl"] for r in rows], label=stage)
  axes[1].set(title="indexer KL (sum over layers)", xlabel="stage step", yscale="log")
  axes[1].legend()
  before = [{"step": 0, "eval_topk_mass": results["dense"]["topk_mass"]}] if "dense" in results else []
  # (the dense model's mass, where the warm-up starts)
  for stage, first in (("warmup", before), ("sparse", [])):
    rows = first + [r for r in runs.get(stage, []) if "eval_topk_mass" in r]
    axes[2].plot([r["step"] for r in rows], [r["eval_topk_mass"] for r in rows], "o-", label=stage)
  axes[2].set(title="dense attention mass in top-k", xlabel="stage step", ylim=(0, 1))
  axes[2].legend()
  names = [s for s in STAGES if s in runs]
  times = [np.median([r["step_time_s"] for r in runs[s] if "step_time_s" in r][1:] or [np.nan]) for s in names]
  axes[3].bar(names, times)
  axes[3].set(title="median step time (s)")
  if len(pairs(runs)) >= 2:  # the per-batch gap of the two branches, raw and as a running mean
    steps, sparse, base = np.array(pairs(runs)).T
    gap = 100 * (sparse / base - 1)
    axes[4].plot(steps, gap, ".", alpha=0.4, label="per batch")
    axes[4].plot(steps, np.cumsum(gap) / np.arange(1, len(gap) + 1), label="running mean")
    axes[4].axhline(0, color="gray", lw=0.5)
    axes[4].axhspan(-2, 2, color="green", alpha=0.08, label="goal: within 2%")
    axes[4].set(title="sparse vs dense_cont LM loss, same batches (%)", xlabel="sparse stage step")
    axes[4].legend()
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
