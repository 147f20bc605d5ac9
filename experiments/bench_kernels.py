"""Kernel benchmarks on the GPU machine: one process, one run, a table and a JSON record.

  python -m experiments.bench_kernels --sections=index_topk --seq_lens=8192,32768,131072

Each op keeps its benchmark beside it (`pallas_kernels/<op>/bench.py`) with `SECTIONS: dict[name, run]`,
`run(cfg) -> list[dict]`; every row is printed as it is measured, so a time-out still leaves results. The JSON
record (date, git commit, device kind, exact command, rows) goes to `--out_dir`, outside the repository by
default, rewritten after each row (sections emit rows through `timing.emit`); a section that raises keeps the rows
it measured, is recorded as failed, and the next one runs. The
current tables under `benchmarks/` cite the records they were made from.
"""

import importlib
import sys

import jax
from absl import flags

from experiments import cli, records
from pallas_kernels.benchmarking import sections as sections_lib

# Modules that define SECTIONS, in the order their sections run.
BENCH_MODULES = (
    "pallas_kernels.lightning_indexer.bench",
    "pallas_kernels.index_decode.bench",
    "pallas_kernels.topk.bench",
    "pallas_kernels.sparse_mla.bench",
    "pallas_kernels.mla_decode.bench",
    "pallas_kernels.indexer_kl.bench",
    "pallas_kernels.moe_gmm.bench",
    "pallas_kernels.flash_attention.bench",
    "pallas_kernels.benchmarking.dsa_core",
)

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "32768", "65536", "131072"], "Sequence lengths T.")
_SECTIONS = flags.DEFINE_list("sections", None, "Benchmark sections (default: all); --list_sections names them.")
_LIST = flags.DEFINE_bool("list_sections", False, "Print the section names and exit.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/dsa_jax/benchmarks", "Where the JSON record goes.")


def sections() -> dict:
  """Every benchmark section by name, from the modules of BENCH_MODULES that exist."""
  found = {}
  for module_name in BENCH_MODULES:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if not (e.name and module_name.startswith(e.name)):  # another import failed inside the module
        raise
      continue
    found.update(module.SECTIONS)
  return found


def _table(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
  lines += [" | ".join(fmt(row.get(c, "")) for c in columns) for row in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  available = sections()
  if _LIST.value:
    print("\n".join(available))
    return
  names = _SECTIONS.value or list(available)
  unknown = [n for n in names if n not in available]
  if unknown:
    raise cli.UserError(f"--sections: unknown {unknown}; allowed: {sorted(available)}")
  cli.require_gpu("bench_kernels")
  cfg = dict(seq_lens=cli.positive_ints(_SEQ_LENS))
  record = records.header(jax.devices()[0].device_kind, " ".join(["python -m experiments.bench_kernels",
                                                                   *sys.argv[1:]]))
  path = None

  def write(measured: list[dict]) -> None:
    nonlocal path
    path = records.write(_OUT_DIR.value, "bench_kernels", {**record, "rows": measured})

  rows = sections_lib.run_sections(names, available, cfg, write)
  for section in dict.fromkeys(row.get("section") for row in rows):
    print(f"\n## {section}\n" + _table([r for r in rows if r.get("section") == section]))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  cli.run(main)
