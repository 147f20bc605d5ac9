"""The sampler behind the agent's `GenerateFn`: a two-turn tool rollout keeps masks and sampler data aligned.

A random tiny model does not write tool calls, so the first turn is scripted (a tool call) and the
second comes from the sampler; this checks mechanics only.
"""

import functools

import jax
import numpy as np

from dsa_jax.agent.chat_format import Assistant, ToolCall, User, render_completion
from dsa_jax.agent.rollout import Generation, RolloutConfig, rollout
from dsa_jax.agent.sampler_adapter import SamplerGenerateFn
from dsa_jax.agent.tools import Tool, ToolRegistry
from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.model import functional
from dsa_jax.model.config import tiny
from dsa_jax.sampling.sampling_mask import kept_log_softmax
from dsa_jax.sampling import SamplingConfig, train_layout

TOK = ByteTokenizer()
CFG = tiny().replace(vocab_size=TOK.vocab_size, num_mtp_layers=0)
REGISTRY = ToolRegistry((Tool("add", "Add two integers.", {
    "type": "object", "required": ["a", "b"],
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}, lambda a, b: a + b),))


def test_two_turn_rollout_with_the_sampler():
  params = jax.jit(functools.partial(functional.init, CFG, seed=0))()
  sampler = SamplerGenerateFn(CFG, params, SamplingConfig(max_new_tokens=8, top_p=0.95, k_max=16), seed=0,
                              bucket=128, pad_id=TOK.pad_id)
  scripted = Assistant(reasoning="add", tool_calls=(ToolCall("add", {"a": 2, "b": 3}),))
  calls = []

  def generate(prompt_tokens, max_new_tokens, stop_ids):
    calls.append(len(prompt_tokens))
    if len(calls) == 1:
      tokens = TOK.encode(render_completion(scripted))
      return Generation(tokens, [0.0] * len(tokens))
    return sampler(prompt_tokens, max_new_tokens, stop_ids)

  result = rollout(generate, TOK, REGISTRY, (User("2 + 3?"),), RolloutConfig(window=1024, max_new_tokens=8))
  assert result.steps == 2 and result.tool_calls == 1
  (traj,) = result.trajectories
  start = calls[1]  # the sampler's turn: the last tokens of the trajectory
  n = len(traj.tokens) - start
  assert 1 <= n <= 8 and (traj.loss_mask[start:] == 1).all()
  assert all(traj.kept_sets[j] is not None and traj.tokens[j] in traj.kept_sets[j] for j in range(start, start + n))
  assert set(traj.routes[start]) == {1, 2}  # the MoE layers of the tiny model
  # The recorded log-probs are those of the model over the recorded kept sets (fp32 sampler).
  ids = np.asarray(traj.tokens)[None]
  positions, segments = train_layout(np.asarray([ids.shape[1]]), ids.shape[1], ids.shape[1])
  logits = functional.apply(CFG, params, ids, positions=positions, segment_ids=segments).logits[0]
  kept = np.full((n, 16), -1, np.int32)
  for row, j in enumerate(range(start, start + n)):
    kept[row, :len(traj.kept_sets[j])] = traj.kept_sets[j]
  logp = kept_log_softmax(logits[start - 1:-1], kept, ids[0, start:])
  np.testing.assert_allclose(np.asarray(logp), traj.logprobs[start:], atol=1e-4)
