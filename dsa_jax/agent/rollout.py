"""Multi-turn tool-use rollouts in the DeepSeek-V3.2 format, with the data GRPO needs (spec §3–§4).

The loop: generate until `<｜end▁of▁sentence｜>`, parse the turn (`parse.parse_completion`), run its tool
calls through the registry, append the `<function_results>` block (which ends with the next generation
prefix) and continue, until the model answers without a tool call or a limit is hit. Because the format is
prefix-stable within a user turn (thinking retention, `chat_format`), the context grows by appending the
sampled tokens and the tokens of each results block; nothing is re-tokenised. Messages and tool results are
tokenized with `chat_format.tokenize_messages`: text that spells a marker stays plain text.

Per token the trajectory records a loss mask (1 only on sampled tokens) and the sampler's log-probability,
kept set (Keep Sampling Mask) and routes (Keep Routing), aligned with the tokens. When a context policy
rewrites the context (`context_policies`), the current context is closed as one trajectory and a new one
starts from the rewritten messages, with mask 0 on everything carried over.

The model is reached only through `GenerateFn`, so any sampler plugs in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np

from dsa_jax.agent import context_policies
from dsa_jax.agent.chat_format import MODES, Assistant, Message, ToolResult, tokenize_messages
from dsa_jax.agent.parse import ParseError, parse_completion
from dsa_jax.agent.tools import ToolRegistry
from dsa_jax.data.tokenizer import Tokenizer

FINISH_REASONS = ("answer", "parse_error", "truncated", "context_full", "max_steps")


@dataclasses.dataclass(frozen=True)
class Generation:
  """What a sampler returns for one call. `tokens` include the stop token when one was hit; the optional
  per-token `kept_sets` (top-p/top-k support) and `routes` (MoE expert choices) are opaque to the loop."""

  tokens: Sequence[int]
  logprobs: Sequence[float]
  kept_sets: Optional[Sequence[Any]] = None
  routes: Optional[Sequence[Any]] = None

  def __post_init__(self):
    n = len(self.tokens)
    for field in ("logprobs", "kept_sets", "routes"):
      value = getattr(self, field)
      if value is not None and len(value) != n:
        raise ValueError(f"Generation.{field} has length {len(value)}, tokens have length {n}")


class GenerateFn(Protocol):
  def __call__(self, prompt_tokens: list[int], max_new_tokens: int, stop_ids: Sequence[int]) -> Generation:
    ...


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """`window`: the context window in tokens (the token budget of one context); `max_new_tokens`: per
  model call; `max_steps`: model calls per rollout."""

  mode: str = "thinking"
  window: int = 4096
  max_new_tokens: int = 1024
  max_steps: int = 16

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"RolloutConfig.mode={self.mode!r}; allowed: {MODES}")
    for field in ("window", "max_new_tokens", "max_steps"):
      if getattr(self, field) < 1:
        raise ValueError(f"RolloutConfig.{field}={getattr(self, field)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One context as a training sequence. Arrays are [T]; `kept_sets`/`routes` are length-T tuples with None
  where the token was not sampled, or None when the sampler reported none."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  logprobs: np.ndarray
  kept_sets: Optional[tuple[Any, ...]]
  routes: Optional[tuple[Any, ...]]


@dataclasses.dataclass(frozen=True)
class RolloutResult:
  trajectories: tuple[Trajectory, ...]
  messages: tuple[Message, ...]
  finish_reason: str
  steps: int
  tool_calls: int
  context_lengths: tuple[int, ...]  # context tokens before each model call
  final: Optional[Assistant] = None
  parse_error: Optional[ParseError] = None

  @property
  def success(self) -> bool:
    """The model gave an answer within the limits (whether it is right is the reward's business)."""
    return self.finish_reason == "answer"


class _Context:
  """The growing token sequence of one context and its per-token annotations."""

  def __init__(self, prompt: list[int]):
    self.tokens, self.mask, self.logprobs = list(prompt), [0] * len(prompt), [0.0] * len(prompt)
    self.kept: list[Any] = [None] * len(prompt)
    self.routes: list[Any] = [None] * len(prompt)
    self.has_kept = self.has_routes = False

  def __len__(self) -> int:
    return len(self.tokens)

  def add_prompt(self, tokens: list[int]) -> None:
    self.tokens += tokens
    self.mask += [0] * len(tokens)
    self.logprobs += [0.0] * len(tokens)
    self.kept += [None] * len(tokens)
    self.routes += [None] * len(tokens)

  def add_generation(self, gen: Generation) -> None:
    n = len(gen.tokens)
    self.tokens += [int(t) for t in gen.tokens]
    self.mask += [1] * n
    self.logprobs += [float(x) for x in gen.logprobs]
    self.kept += list(gen.kept_sets) if gen.kept_sets is not None else [None] * n
    self.routes += list(gen.routes) if gen.routes is not None else [None] * n
    self.has_kept |= gen.kept_sets is not None
    self.has_routes |= gen.routes is not None

  def freeze(self) -> Trajectory:
    return Trajectory(
        tokens=np.asarray(self.tokens, np.int32), loss_mask=np.asarray(self.mask, np.int32),
        logprobs=np.asarray(self.logprobs, np.float32),
        kept_sets=tuple(self.kept) if self.has_kept else None,
        routes=tuple(self.routes) if self.has_routes else None)


def rollout(generate: GenerateFn, tokenizer: Tokenizer, registry: ToolRegistry, messages: Sequence[Message],
            config: RolloutConfig = RolloutConfig(),
            policy: Optional[context_policies.ContextPolicy] = None) -> RolloutResult:
  """Run one multi-turn episode from `messages` (typically System with tools, then User)."""
  messages = tuple(messages)
  context = _Context(tokenize_messages(tokenizer, messages, config.mode))
  closed: list[Trajectory] = []
  lengths: list[int] = []
  n_calls = 0

  def done(reason: str, steps: int, final: Optional[Assistant] = None,
           error: Optional[ParseError] = None) -> RolloutResult:
    return RolloutResult(tuple(closed) + (context.freeze(),), messages, reason, steps, n_calls,
                         tuple(lengths), final, error)

  for step in range(config.max_steps):
    room = config.window - len(context)
    if room <= 0:
      return done("context_full", step)
    lengths.append(len(context))
    gen = generate(list(context.tokens), min(config.max_new_tokens, room), (tokenizer.eos_id,))
    context.add_generation(gen)
    if not gen.tokens or int(gen.tokens[-1]) != tokenizer.eos_id:
      return done("truncated", step + 1)
    turn: Union[Assistant, ParseError] = parse_completion(
        tokenizer.decode(gen.tokens), config.mode, registry.names)
    if isinstance(turn, ParseError):
      return done("parse_error", step + 1, error=turn)
    messages += (turn,)
    if not turn.tool_calls:
      return done("answer", step + 1, final=turn)
    n_calls += len(turn.tool_calls)
    first_result = len(messages)
    messages += tuple(ToolResult(registry.call(call).content) for call in turn.tool_calls)
    context.add_prompt(tokenize_messages(tokenizer, messages, config.mode, start=first_result))
    if policy is not None and context_policies.should_trigger(policy, len(context), config.window):
      messages = policy.apply(messages)
      closed.append(context.freeze())
      context = _Context(tokenize_messages(tokenizer, messages, config.mode))
  return done("max_steps", config.max_steps)
