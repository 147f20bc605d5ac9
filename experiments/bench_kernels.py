"""Kernel benchmarks on the GPU machine (issue 3): one process, one run, a table and a JSON record.

  python -m experiments.bench_kernels --sections=indexer_topk --seq_lens=8192,32768,131072

Each section is a module of `experiments.bench_sections` with `run(cfg) -> list[dict]`; a section whose
module does not exist yet is skipped with a note. JSON goes to <out_dir>/bench_kernels_<date>.json with the
date, git commit, device kind and the exact command line.
"""

import datetime
import importlib
import json
import pathlib
import subprocess
import sys

import jax
from absl import app, flags

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "32768", "65536", "131072"], "Sequence lengths T.")
_SECTIONS = flags.DEFINE_list("sections", ["indexer_topk", "topk", "sparse_mla", "indexer_kl", "moe_gmm", "dsa_layer"], "Benchmark sections.")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON record goes.")


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _table(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
  lines += [" | ".join(fmt(row.get(c, "")) for c in columns) for row in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  cfg = dict(seq_lens=[int(t) for t in _SEQ_LENS.value])
  rows = []
  for name in _SECTIONS.value:
    try:
      section = importlib.import_module(f"experiments.bench_sections.{name}")
    except ModuleNotFoundError as e:
      print(f"[bench_kernels] section {name!r} skipped: {e}")
      continue
    rows += section.run(cfg)
  now = datetime.datetime.now(datetime.timezone.utc)
  record = dict(date=now.isoformat(timespec="seconds"), commit=_git_commit(), device=jax.devices()[0].device_kind,
                command=" ".join(["python -m experiments.bench_kernels", *sys.argv[1:]]), rows=rows)
  out = pathlib.Path(_OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"bench_kernels_{now.strftime('%Y%m%d_%H%M%S')}.json"
  path.write_text(json.dumps(record, indent=1))
  for section in dict.fromkeys(row.get("section") for row in rows):
    print(f"\n## {section}\n" + _table([r for r in rows if r.get("section") == section]))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  app.run(main)
