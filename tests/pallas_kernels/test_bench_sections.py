"""The section loop of experiments/bench_kernels (`benchmarking.sections.run_sections`): every emitted row reaches
the record at once, and a section that fails keeps the rows it measured before it failed."""

from pallas_kernels.benchmarking import sections, timing


def test_a_failing_section_keeps_its_rows_and_the_next_one_runs():
  written = []

  def failing(cfg):
    rows = []
    timing.emit(rows, dict(section="a", T=cfg["seq_lens"][0]))
    timing.emit(rows, dict(section="a", T=2))
    raise MemoryError("out of memory at the baseline")

  def fine(cfg):
    del cfg
    rows = []
    timing.emit(rows, dict(section="b", T=3))
    return rows

  rows = sections.run_sections(["a", "b"], {"a": failing, "b": fine}, dict(seq_lens=[1]),
                               lambda measured: written.append(list(measured)))
  assert rows == [dict(section="a", T=1), dict(section="a", T=2),
                  dict(section="a", status="failed", error="MemoryError: out of memory at the baseline"),
                  dict(section="b", T=3)]
  # On disk after each row (a time limit loses nothing printed), then after each section.
  assert written[0] == [dict(section="a", T=1)] and written[1] == rows[:2]
  assert written[-1] == rows
  assert timing.on_emit is None
