"""The synthetic KV environment: verifiable chains, reward, and the scripted reference agent."""

import json

import pytest

from dsa_jax.agent import kv_env
from dsa_jax.agent.chat_format import Assistant, ToolCall, ToolResult, User
from dsa_jax.agent.context_policies import SUMMARY_HEADER
from dsa_jax.agent.rollout import RolloutConfig, RolloutResult
from dsa_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def run(task, error_rate=0.0, seed=0, mode="thinking"):
  config = RolloutConfig(mode=mode, window=100_000, max_steps=40)
  return kv_env.run_episode(task, TOK, config, error_rate=error_rate, seed=seed)


def test_task_is_a_chain_to_a_terminal_value():
  task = kv_env.make_task(seed=1)
  assert task == kv_env.make_task(seed=1)
  key = task.start
  for _ in range(task.hops - 1):
    assert not task.lookup(key)["terminal"]
    key = task.lookup(key)["value"]
  assert task.lookup(key) == {"key": key, "value": task.answer, "terminal": True, "notes": task.notes[key]}
  assert len(task.store) == kv_env.KVTaskConfig().num_keys
  with pytest.raises(KeyError):
    task.lookup("nokey")


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_scripted_agent_solves_in_hops_plus_one_steps(mode):
  for seed in range(5):
    task = kv_env.make_task(seed)
    result = run(task, mode=mode)
    assert result.success and kv_env.reward(task, result) == 1.0
    assert (result.steps, result.tool_calls) == (task.hops + 1, task.hops)


def test_errors_cost_steps_but_not_success():
  task = kv_env.make_task(seed=2)
  result = run(task, error_rate=0.4, seed=3)
  assert result.success and kv_env.reward(task, result) == 1.0
  failed = [m for m in result.messages if isinstance(m, ToolResult) and m.content.startswith("error:")]
  assert failed and result.steps == task.hops + 1 + len(failed)


def test_reward_checks_the_answer_line():
  task = kv_env.make_task(seed=4)

  def result_with(content):
    return RolloutResult((), (), "answer", 1, 0, (), final=Assistant(content=content))

  assert kv_env.reward(task, result_with(f"ANSWER: {task.answer}")) == 1.0
  assert kv_env.reward(task, result_with("ANSWER: v000000")) == 0.0
  assert kv_env.reward(task, result_with(task.answer)) == 0.0
  assert kv_env.reward(task, RolloutResult((), (), "max_steps", 1, 0, ())) == 0.0


def test_summary_carries_the_progress():
  record = json.dumps({"key": "k1", "value": "k00abc", "terminal": False, "notes": ""})
  msgs = (User("q"), Assistant(tool_calls=(ToolCall("lookup", {"key": "k1"}),)), ToolResult(record))
  assert kv_env.summarize_progress(msgs) == "next key to look up: `k00abc`"
  assert kv_env.summarize_progress((User("q" + SUMMARY_HEADER + "next key to look up: `k1`"),)) == (
      "next key to look up: `k1`")
  assert kv_env.summarize_progress((User("q"),)) == "nothing found yet"
  agent = kv_env.ScriptedKVAgent(TOK)
  turn = agent.decide("<｜User｜>Starting from start key `k0` …" + SUMMARY_HEADER +
                      "next key to look up: `k00abc`<｜Assistant｜><think>")
  assert turn.tool_calls == (ToolCall("lookup", {"key": "k00abc"}),)


def test_config_errors():
  with pytest.raises(ValueError, match="min_hops <= max_hops"):
    kv_env.KVTaskConfig(min_hops=5, max_hops=2)
  with pytest.raises(ValueError, match="error_rate=1.0"):
    kv_env.ScriptedKVAgent(TOK, error_rate=1.0)
