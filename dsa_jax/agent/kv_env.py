"""A synthetic tool environment with verifiable answers, and a scripted reference agent for it.

The task stands in for the search-agent setting of DeepSeek-V3.2 §4 (long tool-use trajectories that
outgrow the context window): a generated key-value store, a start key, and a chain of `hops` lookups
(each value names the next key) ending at a terminal value, the answer. The only tool is `lookup(key)`,
whose records carry filler notes so that the context fills up the way search results do. The reward is 1
when the final answer line `ANSWER: <value>` names the terminal value, else 0, so the task serves GRPO
directly.

`ScriptedKVAgent` is a `rollout.GenerateFn` that reads only the visible context (the decoded prompt): it
follows the latest successful lookup, mistypes a key with probability `error_rate`, and answers once it
sees a terminal record. It keeps no memory outside the context, so what a context policy removes is lost.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Optional, Sequence

from dsa_jax.agent.chat_format import (
    MODES, Assistant, Message, System, ToolCall, ToolResult, User, tokenize_completion,
)
from dsa_jax.agent.context_policies import SUMMARY_HEADER, ContextPolicy
from dsa_jax.agent.rollout import Generation, RolloutConfig, RolloutResult, rollout
from dsa_jax.agent.tools import Tool, ToolRegistry
from dsa_jax.data.tokenizer import ASSISTANT, USER, Tokenizer

_WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kelp", "lumen", "marble", "nectar", "onyx", "prairie", "quartz", "russet", "sierra", "tundra")
_START = re.compile(r"start key `(k[0-9a-f]+)`")
_PROGRESS = re.compile(r"next key to look up: `(k[0-9a-f]+)`")
_FOUND = re.compile(r"answer found: `([^`]+)`")
_ANSWER = re.compile(r"ANSWER:\s*(\S+)")


@dataclasses.dataclass(frozen=True)
class KVTaskConfig:
  num_keys: int = 64
  min_hops: int = 3
  max_hops: int = 8
  notes_words: int = 24  # filler per record: makes each lookup cost context, like a search result

  def __post_init__(self):
    if not 1 <= self.min_hops <= self.max_hops:
      raise ValueError(f"KVTaskConfig needs 1 <= min_hops <= max_hops, got {self.min_hops}, {self.max_hops}")
    if self.num_keys < self.max_hops:
      raise ValueError(f"KVTaskConfig.num_keys={self.num_keys} must be >= max_hops={self.max_hops}")
    if self.notes_words < 0:
      raise ValueError(f"KVTaskConfig.notes_words={self.notes_words} must be >= 0")


@dataclasses.dataclass(frozen=True)
class KVTask:
  store: dict[str, str]  # key -> next key, or the answer for the chain's last key
  notes: dict[str, str]
  start: str
  answer: str
  hops: int

  @property
  def question(self) -> str:
    return (f"Starting from start key `{self.start}`, look keys up one after another: each record's value "
            "is the next key, until a record is marked terminal. Reply with `ANSWER: <terminal value>`.")

  def lookup(self, key: str) -> dict:
    if key not in self.store:
      raise KeyError(f"no record for key {key!r}")
    value = self.store[key]
    return {"key": key, "value": value, "terminal": not value.startswith("k"), "notes": self.notes[key]}


def make_task(seed: int, config: KVTaskConfig = KVTaskConfig()) -> KVTask:
  """A store of `num_keys` records; the asked chain has `hops` records, distractor chains fill the rest."""
  rng = random.Random(seed)
  keys = [f"k{x:05x}" for x in rng.sample(range(16 ** 5), config.num_keys)]
  hops = rng.randint(config.min_hops, config.max_hops)
  store: dict[str, str] = {}
  pos = 0
  while pos < len(keys):  # The asked chain first, then distractor chains of random length.
    length = hops if pos == 0 else rng.randint(1, config.max_hops)
    chain = keys[pos:pos + length]
    for a, b in zip(chain, chain[1:]):
      store[a] = b
    store[chain[-1]] = f"v{rng.randrange(16 ** 6):06x}"
    pos += length
  notes = {k: " ".join(rng.choice(_WORDS) for _ in range(config.notes_words)) for k in keys}
  return KVTask(store=store, notes=notes, start=keys[0], answer=store[keys[hops - 1]], hops=hops)


def make_registry(task: KVTask, timeout_s: float = 5.0) -> ToolRegistry:
  lookup = Tool(
      name="lookup", description="Return the record stored under a key.",
      parameters={"type": "object", "properties": {"key": {"type": "string", "description": "the key"}},
                  "required": ["key"], "additionalProperties": False},
      fn=task.lookup, timeout_s=timeout_s)
  return ToolRegistry((lookup,))


def initial_messages(task: KVTask, registry: ToolRegistry) -> tuple[Message, ...]:
  return (System("You are a careful assistant that uses tools.", tools=registry.schemas()),
          User(task.question))


def reward(task: KVTask, result: RolloutResult) -> float:
  """1.0 iff the rollout ended with an answer whose `ANSWER:` line names the terminal value."""
  if result.final is None:
    return 0.0
  found = _ANSWER.search(result.final.content)
  return float(found is not None and found.group(1) == task.answer)


def _records(results: Sequence[str]) -> list[dict]:
  records = []
  for text in results:
    try:
      record = json.loads(text)
    except ValueError:
      continue  # a tool error message
    if isinstance(record, dict) and "value" in record:
      records.append(record)
  return records


def summarize_progress(messages: Sequence[Message]) -> str:
  """The scripted summariser for the Summary policy: the next key to look up, or the answer found."""
  records = _records([m.content for m in messages if isinstance(m, ToolResult)])
  if records:
    latest = records[-1]
    if latest["terminal"]:
      return f"answer found: `{latest['value']}`"
    return f"next key to look up: `{latest['value']}`"
  earlier = [m.content.split(SUMMARY_HEADER, 1)[1] for m in messages
             if isinstance(m, User) and SUMMARY_HEADER in m.content]
  return earlier[-1] if earlier else "nothing found yet"


class ScriptedKVAgent:
  """A `GenerateFn` that solves KV tasks from the visible context alone (log-probs are 0)."""

  def __init__(self, tokenizer: Tokenizer, mode: str = "thinking", error_rate: float = 0.0, seed: int = 0):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; allowed: {MODES}")
    if not 0.0 <= error_rate < 1.0:
      raise ValueError(f"error_rate={error_rate} must lie in [0, 1)")
    self.tokenizer, self.mode, self.error_rate = tokenizer, mode, error_rate
    self._rng = random.Random(seed)

  def decide(self, context: str) -> Assistant:
    """The next assistant turn given the decoded prompt."""
    turn_start = context.rfind(USER)
    question = context[turn_start:context.find(ASSISTANT, turn_start)]
    records = _records(re.findall(r"<result>(.*?)</result>", context[turn_start:], flags=re.DOTALL))
    if records and records[-1]["terminal"]:
      return self._answer(records[-1]["value"], "the latest record is terminal")
    found = _FOUND.search(question)
    if not records and found:
      return self._answer(found.group(1), "the summary holds the answer")
    if records:
      key, why = records[-1]["value"], f"record {records[-1]['key']} points to {records[-1]['value']}"
    else:
      progress = _PROGRESS.search(question) or _START.search(question)
      key, why = (progress.group(1), "starting from the question") if progress else ("k00000", "no key seen")
    if self._rng.random() < self.error_rate:
      key = key[:-1] + ("0" if key[-1] != "0" else "1")  # a typo: costs a step and context
    return Assistant(reasoning=f"{why}; next I look up {key}.",
                     tool_calls=(ToolCall("lookup", {"key": key}),))

  def _answer(self, value: str, why: str) -> Assistant:
    return Assistant(reasoning=f"{why}, so the answer is {value}.", content=f"ANSWER: {value}")

  def __call__(self, prompt_tokens: list[int], max_new_tokens: int,
               stop_ids: Optional[Sequence[int]] = None) -> Generation:
    turn = self.decide(self.tokenizer.decode(prompt_tokens))
    tokens = tokenize_completion(self.tokenizer, turn, self.mode)[:max_new_tokens]
    return Generation(tokens=tokens, logprobs=[0.0] * len(tokens))


def run_episode(task: KVTask, tokenizer: Tokenizer, config: RolloutConfig,
                policy: Optional[ContextPolicy] = None, error_rate: float = 0.0, seed: int = 0) -> RolloutResult:
  """One rollout of the scripted agent on `task`."""
  registry = make_registry(task)
  agent = ScriptedKVAgent(tokenizer, config.mode, error_rate, seed)
  return rollout(agent, tokenizer, registry, initial_messages(task, registry), config, policy)
