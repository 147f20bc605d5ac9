"""dsa_jax.progress: one line per interval off a terminal, a bar redrawn in place on one, the time left from the
rate after the first (compiling) step."""

import io

from dsa_jax.progress import Progress, duration


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_off_a_terminal_one_line_per_interval_with_the_time_left():
  out, clock = io.StringIO(), _Clock()
  progress = Progress(100, "dense", every=10, stream=out, clock=clock)
  clock.now = 30.0  # the first step compiles: not counted in the rate
  progress.update(1, "loss 2.0")
  for step in range(2, 21):
    clock.now += 0.5
    progress.update(step, "loss 1.0")
  lines = out.getvalue().splitlines()
  assert lines == ["[dense] step 1/100 loss 2.0 | 30 s elapsed, time left unknown",
                   "[dense] step 10/100 loss 1.0 | 34 s elapsed, ~45 s left",
                   "[dense] step 20/100 loss 1.0 | 40 s elapsed, ~40 s left"]


def test_on_a_terminal_the_bar_is_redrawn_and_ends_its_line():
  out, clock = _Terminal(), _Clock()
  progress = Progress(4, "grpo", stream=out, clock=clock)
  for step in range(1, 5):
    clock.now += 1.0
    progress.update(step)
  text = out.getvalue()
  assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
  assert "[grpo] [####################] step 4/4 | 4 s elapsed, ~0 s left" in text
  progress.close()
  assert out.getvalue() == text  # nothing left open


def test_close_ends_an_open_line():
  out = _Terminal()
  progress = Progress(10, stream=out, clock=_Clock())
  progress.update(3)
  assert not out.getvalue().endswith("\n")
  progress.close()
  assert out.getvalue().endswith("\n")


def test_duration():
  assert [duration(s) for s in (3.4, 245, 7390)] == ["3 s", "4m05s", "2h03m"]
