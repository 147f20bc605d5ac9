"""Context policies: what each one drops, when it triggers, and exact token accounting in a rollout."""

import dataclasses

import numpy as np
import pytest

from dsa_jax.agent import kv_env
from dsa_jax.agent.chat_format import Assistant, System, ToolCall, ToolResult, User, encode_messages
from dsa_jax.agent.context_policies import (
    SUMMARY_HEADER, Discard, Summary, context_tokens, parallel_fewest_step, should_trigger, tool_rounds,
)
from dsa_jax.agent.rollout import RolloutConfig
from dsa_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def conversation(n_rounds):
  msgs = [System("s"), User("q")]
  for i in range(n_rounds):
    msgs += [Assistant(reasoning=f"r{i}", tool_calls=(ToolCall("f", {"i": i}), ToolCall("g"))),
             ToolResult(f"a{i}"), ToolResult(f"b{i}")]
  return tuple(msgs)


def kept_rounds(messages):
  return [messages[start].reasoning for start, _ in tool_rounds(messages)]


@pytest.mark.parametrize("n_rounds, kept", [(1, []), (2, ["r1"]), (4, ["r3"]), (8, ["r6", "r7"])])
def test_discard_75_drops_the_first_three_quarters(n_rounds, kept):
  assert kept_rounds(Discard(0.75).apply(conversation(n_rounds))) == kept


def test_discard_all_keeps_only_the_non_tool_messages():
  msgs = conversation(5) + (Assistant(content="final"), User("q2"))
  assert Discard(1.0).apply(msgs) == (System("s"), User("q"), Assistant(content="final"), User("q2"))
  assert Discard(1.0).name == "discard-all" and Discard(0.75).name == "discard-75%"


def test_summary_restarts_from_the_last_user_turn():
  policy = Summary(lambda msgs: f"{len(msgs)} messages")
  once = policy.apply(conversation(3))
  assert once == (System("s"), User("q" + SUMMARY_HEADER + "11 messages"))
  twice = policy.apply(once + conversation(1)[2:])
  assert twice == (System("s"), User("q" + SUMMARY_HEADER + "5 messages"))  # replaced, not stacked


def test_trigger_is_a_fraction_of_the_window():
  assert not should_trigger(Discard(), 800, 1000) and should_trigger(Discard(), 801, 1000)
  assert should_trigger(Discard(trigger=0.5), 501, 1000)
  with pytest.raises(ValueError, match=r"Discard.fraction=0 must lie in \(0, 1\]"):
    Discard(0)
  with pytest.raises(ValueError, match=r"Summary.trigger=1.5"):
    Summary(str, trigger=1.5)


def test_context_tokens_is_the_encoded_length():
  msgs = conversation(2)
  assert context_tokens(msgs, TOK, "thinking") == len(TOK.encode(encode_messages(msgs, "thinking")))


@pytest.mark.parametrize("policy", [Discard(0.75), Discard(1.0), Summary(kv_env.summarize_progress)],
                         ids=lambda p: p.name)
def test_rollout_token_accounting_is_exact(policy):
  task = kv_env.make_task(seed=11, config=kv_env.KVTaskConfig(min_hops=8, max_hops=8))
  config = RolloutConfig(window=2600, max_steps=12)
  result = kv_env.run_episode(task, TOK, config, policy)
  assert len(result.trajectories) > 1  # the policy fired
  for closed in result.trajectories[:-1]:
    assert len(closed.tokens) > policy.trigger * config.window
  last = result.trajectories[-1]
  np.testing.assert_array_equal(last.tokens, TOK.encode(encode_messages(result.messages)))
  # After a rewrite everything carried over is prompt (mask 0); each sampled run starts exactly at the
  # context length recorded before its model call.
  run_starts = np.flatnonzero(np.diff(np.concatenate([[0], last.loss_mask])) == 1)
  assert list(run_starts) == list(result.context_lengths[len(result.context_lengths) - len(run_starts):])
  assert max(result.context_lengths) <= config.window


def test_parallel_fewest_step_keeps_the_shortest_success():
  @dataclasses.dataclass
  class R:
    success: bool
    steps: int

  runs = [R(False, 1), R(True, 7), R(True, 4), R(True, 5)]
  best, everything = parallel_fewest_step(lambda i: runs[i], 4)
  assert best is runs[2] and everything == runs
  best, _ = parallel_fewest_step(lambda i: runs[0], 2)
  assert best is runs[0]
  with pytest.raises(ValueError, match="n=0"):
    parallel_fewest_step(lambda i: runs[0], 0)
