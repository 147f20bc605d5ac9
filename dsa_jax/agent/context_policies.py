"""Context management for long tool-use trajectories (DeepSeek-V3.2 paper §4 search agents; spec §4).

When the context passes a fraction of the window (80% by default), a policy rewrites the conversation:
- `Summary`: replace the trajectory since the last user turn by a summary (from a given function — a
  scripted summariser or the model itself) appended to that user turn, and restart from there;
- `Discard(0.75)`: drop the first 75% of the tool-call history (assistant turns with tool calls and their
  results);
- `Discard(1.0)`, Discard-all: drop all tool-call history;
- `parallel_fewest_step`: the baseline without rewriting — N independent rollouts, keep the successful
  one with the fewest steps.
Token counts are those of the real encoding (`context_tokens`), never estimates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol, Sequence, TypeVar

from dsa_jax.agent.chat_format import Assistant, Message, ToolResult, last_user_index, tokenize_messages
from dsa_jax.data.tokenizer import Tokenizer

SUMMARY_HEADER = "\n\n## Summary of the work so far\n"


class ContextPolicy(Protocol):
  name: str
  trigger: float  # rewrite once the context exceeds trigger * window tokens

  def apply(self, messages: Sequence[Message]) -> tuple[Message, ...]:
    ...


def _check_fraction(owner: str, field: str, value: float) -> None:
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{owner}.{field}={value} must lie in (0, 1]")


def context_tokens(messages: Sequence[Message], tokenizer: Tokenizer, mode: str) -> int:
  """Exact length in tokens of the prompt that `messages` encode to."""
  return len(tokenize_messages(tokenizer, messages, mode))


def should_trigger(policy: ContextPolicy, n_tokens: int, window: int) -> bool:
  return n_tokens > policy.trigger * window


def tool_rounds(messages: Sequence[Message]) -> list[tuple[int, int]]:
  """[start, end) index ranges of each assistant turn with tool calls plus the results that follow it."""
  rounds = []
  for i, msg in enumerate(messages):
    if isinstance(msg, Assistant) and msg.tool_calls:
      end = i + 1
      while end < len(messages) and isinstance(messages[end], ToolResult):
        end += 1
      rounds.append((i, end))
  return rounds


@dataclasses.dataclass(frozen=True)
class Discard:
  """Drop the first `fraction` of tool rounds (at least one); `fraction=1.0` is Discard-all."""

  fraction: float = 0.75
  trigger: float = 0.8

  def __post_init__(self):
    _check_fraction("Discard", "fraction", self.fraction)
    _check_fraction("Discard", "trigger", self.trigger)

  @property
  def name(self) -> str:
    return "discard-all" if self.fraction == 1.0 else f"discard-{round(100 * self.fraction)}%"

  def apply(self, messages: Sequence[Message]) -> tuple[Message, ...]:
    rounds = tool_rounds(messages)
    n_drop = max(1, math.floor(self.fraction * len(rounds))) if rounds else 0
    dropped = {i for start, end in rounds[:n_drop] for i in range(start, end)}
    return tuple(m for i, m in enumerate(messages) if i not in dropped)


@dataclasses.dataclass(frozen=True)
class Summary:
  """Keep everything up to the last user turn, append `summarize(messages)` to it, drop the rest."""

  summarize: Callable[[Sequence[Message]], str]
  trigger: float = 0.8
  name: str = "summary"

  def __post_init__(self):
    _check_fraction("Summary", "trigger", self.trigger)

  def apply(self, messages: Sequence[Message]) -> tuple[Message, ...]:
    last = last_user_index(messages)
    if last < 0:
      raise ValueError("Summary needs a user or developer message to restart from; found none")
    user = messages[last]
    base = user.content.split(SUMMARY_HEADER)[0]  # an earlier summary is replaced, not stacked
    restarted = dataclasses.replace(user, content=base + SUMMARY_HEADER + self.summarize(messages))
    return tuple(messages[:last]) + (restarted,)


R = TypeVar("R")


def parallel_fewest_step(run: Callable[[int], R], n: int) -> tuple[R, list[R]]:
  """Run `run(i)` for i < n; return the successful result with the fewest steps (else the first) and all.

  Results need `.success` and `.steps` (as `rollout.RolloutResult` has)."""
  if n < 1:
    raise ValueError(f"n={n} must be >= 1")
  results = [run(i) for i in range(n)]
  successes = [r for r in results if r.success]
  best = min(successes, key=lambda r: r.steps) if successes else results[0]
  return best, results
