"""A progress line for loops of known length (training stages, GRPO): a bar with the time left on a terminal,
one plain line per report elsewhere (logs, pipes, notebooks' captured output).

The caller reports at its own interval (`update(step, text)`); with `every` > 1, reports off the interval are
drawn on a terminal only. On a terminal the line is redrawn in place and ends when the loop reaches `total` or
at `close()`; elsewhere each report is one line, so a log keeps one line per interval. The time left is
extrapolated from the steps since `begin`, by default the first report: the first, compiling step would
otherwise dominate the rate. No dependency beyond the standard library.
"""

import sys
import time
from typing import TextIO

BAR_WIDTH = 20


def duration(seconds: float) -> str:
  """3 s, 4m05s, 2h03m."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
  """Reports `step` of `total` with a label, the caller's text, the elapsed time and an estimate of the time left."""

  def __init__(self, total: int, label: str = "", every: int = 1, stream: TextIO | None = None,
               clock=time.perf_counter):
    self.total, self.label, self.every = total, label, every
    self.stream = stream or sys.stdout
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.clock = clock
    self.started = clock()
    self.origin: tuple[int, float] | None = None  # (step, time) the rate is measured from
    self.open_line = False

  def begin(self, step: int) -> None:
    """Measures the rate from here (after `step`): steps before it (compilation) do not count."""
    self.origin = (step, self.clock())

  def left(self, step: int) -> float | None:
    """Seconds left at the rate since `begin`, None before a step was measured after it."""
    if self.origin is None or step <= self.origin[0]:
      return None
    origin_step, origin_time = self.origin
    return (self.total - step) * (self.clock() - origin_time) / (step - origin_step)

  def line(self, step: int, text: str = "") -> str:
    left = self.left(step)
    timing = f"{duration(self.clock() - self.started)} elapsed, " + (
        f"~{duration(left)} left" if left is not None else "time left unknown")
    head = f"[{self.label}] " if self.label else ""
    if self.tty:
      done = int(BAR_WIDTH * min(step, self.total) / max(self.total, 1))
      head += "[" + "#" * done + "." * (BAR_WIDTH - done) + "] "
    return f"{head}step {step}/{self.total}" + (f" {text}" if text else "") + f" | {timing}"

  def update(self, step: int, text: str = "") -> None:
    first = self.origin is None
    if first:
      self.begin(step)
    if self.tty:
      self.stream.write("\r\x1b[2K" + self.line(step, text))
      self.open_line = step < self.total
      if not self.open_line:
        self.stream.write("\n")
    elif first or step % self.every == 0 or step >= self.total:
      self.stream.write(self.line(step, text) + "\n")
    self.stream.flush()

  def close(self) -> None:
    """Ends a redrawn line (on a terminal) so that the next output starts on its own line."""
    if self.open_line:
      self.stream.write("\n")
      self.stream.flush()
      self.open_line = False
