"""Plots of `long_context` results (matplotlib, Agg): grid heatmaps side by side, the top-k curve, loss by
position. Each function takes the JSON-ready results and writes one PNG."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after choosing the backend
import numpy as np  # noqa: E402

from dsa_jax.evaluation.long_context import mean_exact  # noqa: E402


def grid_heatmaps(grids: dict[str, list[dict]], path: pathlib.Path) -> pathlib.Path:
  """Exact match by needle depth (rows) and context length (columns), averaged over pair counts: one column of
  panels per model (e.g. dense, DSA), one row per hop count."""
  names = list(grids)
  first = grids[names[0]]
  lengths = sorted({c["length"] for c in first})
  depths = sorted({c["depth"] for c in first})
  hops = sorted({c["hops"] for c in first})
  fig, axes = plt.subplots(len(hops), len(names), figsize=(3.4 * len(names) + 1, 3.0 * len(hops)), squeeze=False,
                           layout="constrained")
  for row, h in enumerate(hops):
    for col, name in enumerate(names):
      table = np.array([[mean_exact(grids[name], length=n, depth=d, hops=h) for n in lengths] for d in depths])
      ax = axes[row, col]
      image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
      ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
      ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
      ax.set_title(f"{name}, {h} hop{'s' if h > 1 else ''}: {np.nanmean(table):.2f}", fontsize=9)
      ax.set_xlabel("context length")
      if col == 0:
        ax.set_ylabel("needle depth")
      for (i, j), v in np.ndenumerate(table):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
  fig.colorbar(image, ax=axes, shrink=0.8, label="exact match")
  return _save(fig, path)


def topk_curve(sweep: dict, path: pathlib.Path) -> pathlib.Path:
  """Exact match against evaluation-time top-k (left) and the dense attention mass at the answer query inside the
  top-k set, one line per needle depth (right)."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
  ks = sweep["ks"]
  left.plot(ks, sweep["exact"], "o-")
  left.set(xscale="log", xlabel="top-k (the last: all visible keys)", ylabel="exact match", ylim=(-0.02, 1.02),
           title=f"DSA at length {sweep['length']}: holds down to k={sweep['holds_down_to']}")
  for depth, mass in sweep["mass_by_depth"].items():
    right.plot(ks, mass, "o-", label=f"depth {float(depth):.0%}")
  right.set(xscale="log", xlabel="top-k", ylabel="dense attention mass in top-k", ylim=(0, 1.02),
            title="at the answer query, mean over layers")
  right.legend(fontsize=7)
  return _save(fig, path)


def loss_by_position(losses: dict[str, dict], path: pathlib.Path) -> pathlib.Path:
  """Held-out loss per position bucket, one line per model, with each model's mean and interval in the legend."""
  fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
  for name, result in losses.items():
    edges = result["bucket_edges"]
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    low, high = result["ci95"]
    values = [np.nan if v is None else v for v in result["loss_by_bucket"]]  # None: no token reached the bucket
    ax.plot(mids, values, "o-", label=f"{name}: {result['loss']:.4f} [{low:.4f}, {high:.4f}]")
  ax.set(xlabel="position in document", ylabel="held-out LM loss",
         title=f"{result['batches']} batches (95% t-interval)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
