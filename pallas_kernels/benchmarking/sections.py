"""Running benchmark sections one after another without losing what they measured (used by
`experiments/bench_kernels.py`)."""

from pallas_kernels.benchmarking import timing


def run_sections(names: list[str], available: dict, cfg: dict, write) -> list[dict]:
  """Runs the sections in turn -> their rows. `write(rows so far)` runs after every row a section emits
  (`timing.emit`) and after each section, so that a run stopped by a time limit leaves what it measured; a section
  that raises keeps the rows it emitted, gets a "failed" row, and the next one runs."""
  rows, start = [], 0

  def on_emit():
    write(rows + timing.EMITTED[start:])

  timing.on_emit = on_emit
  try:
    for name in names:
      start = len(timing.EMITTED)
      try:
        rows += available[name](cfg)
      except Exception as e:  # noqa: BLE001 (a section that fails, e.g. out of memory, must not lose the others)
        print(f"[bench_kernels] section {name!r} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
        rows += timing.EMITTED[start:]
        rows.append(dict(section=name, status="failed", error=f"{type(e).__name__}: {str(e)[:500]}"))
      write(rows)
  finally:
    timing.on_emit = None
  return rows
