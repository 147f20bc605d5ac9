"""Decode and prefill cost of one DeepSeek-V3.2 attention layer against the token's position, and the paper's
Figure 3 for our kernels (GPU; issue 23). What is measured and how: `pallas_kernels/benchmarking/decode_layer.py`;
table: benchmarks/decode.md.

  python -m experiments.bench_decode                           # -> /tmp/dsa_jax/bench_decode/<time>/
  python -m experiments.bench_decode --plot_from=RECORD.json   # only redraws the figure from a record (no GPU)
"""

import json
import pathlib
import sys
import time

import jax
from absl import flags

from experiments import cli, records
from pallas_kernels.benchmarking import baselines
from pallas_kernels.benchmarking.decode_layer import (ENTRY_BYTES, LAYERS, copy_tbps, cost_curves, decode_rows,
                                                      prefill_rows)

_POSITIONS = flags.DEFINE_list("positions", ["4096", "16384", "32768", "65536", "131072"], "Context positions P.")
_BATCHES = flags.DEFINE_list("batches", ["1", "32", "128"], "Decode batch sizes B.")
_CACHES = flags.DEFINE_list("caches", ["fp8", "bf16"], "Latent cache dtypes (fp8: FlashMLA's 656-byte entries).")
_PREFILL = flags.DEFINE_list("prefill_lens", ["4096", "16384", "32768", "65536", "131072"],
                             "Prefill lengths T (empty: no prefill rows).")
_USD = flags.DEFINE_float("usd_per_gpu_hour", 2.0, "GPU-hour price of the cost figure (the paper: 2 USD per H800 "
                          "hour).", lower_bound=0.0)
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where the JSON and the PNG go (default /tmp/dsa_jax/bench_decode/"
                               "<time>/).")
_PLOT_FROM = flags.DEFINE_string("plot_from", "", "Only draw the figure from this JSON record.")



def plot(record: dict, usd_per_gpu_hour: float, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, (xs, ys) in cost_curves(record, usd_per_gpu_hour).items():
    ax.plot([x / 1024 for x in xs], ys, marker="o", linestyle="-" if "sparse" in name else "--", label=name)
  ax.set_xlabel("token position (K tokens)")
  ax.set_ylabel(f"USD per million tokens (attention, {LAYERS} layers)")
  ax.set_title(f"{record['device']}, {usd_per_gpu_hour:g} USD per GPU hour, commit {record['commit']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def main(argv):
  del argv
  if _PLOT_FROM.value:
    source = pathlib.Path(_PLOT_FROM.value)
    try:
      record = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise cli.UserError(f"--plot_from={source}: cannot read a JSON record ({e})") from e
    plot(record, _USD.value, pathlib.Path(_OUT_DIR.value or source.parent) / "decode_cost.png")
    return
  cli.require_gpu("bench_decode")
  out_dir = pathlib.Path(_OUT_DIR.value or f"/tmp/dsa_jax/bench_decode/{time.strftime('%Y%m%d_%H%M%S')}")
  device = jax.devices()[0].device_kind
  peak = baselines.peak_hbm()
  record = records.header(device, " ".join(["python -m experiments.bench_decode", *sys.argv[1:]]))
  copy_rate = copy_tbps()
  print(f"{device}: device-to-device copy {copy_rate:.2f} TB/s measured; vendor peak {peak} B/s", flush=True)
  record.update(copy_tbps=copy_rate, peak_bytes_per_s=peak, rows=[])
  unknown = [c for c in _CACHES.value if c not in ENTRY_BYTES]
  if unknown:
    raise cli.UserError(f"--caches: unknown {unknown}; allowed: {sorted(ENTRY_BYTES)}")
  record["rows"] += decode_rows(_CACHES.value, cli.positive_ints(_BATCHES), cli.positive_ints(_POSITIONS), copy_rate,
                                peak)
  path = records.write(str(out_dir), "bench_decode", record)
  if _PREFILL.value:
    record["rows"] += prefill_rows(cli.positive_ints(_PREFILL))
    path = records.write(str(out_dir), "bench_decode", record)
  print(f"wrote {path}")
  plot(record, _USD.value, out_dir / "decode_cost.png")


if __name__ == "__main__":
  cli.run(main)
