"""GRPO rollouts on a verifiable task: G sampled completions per prompt, rule-based rewards, advantages.

DeepSeek-V3.2 §3.1: a group of G outputs per prompt, rewards checked by rules, Â_i = R_i − mean(R). The
batch keeps what the sampler saw (μ's log-probs, the kept sets, the MoE experts of every slot) aligned with
the tokens of the left-padded sequence [prompt | completion] (`sampling.sampler` module doc), so the
trainer can replay routing and truncation exactly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.model.config import ModelConfig
from dsa_jax.rl.advantages import group_advantages
from dsa_jax.rl.rewards import Task
from dsa_jax.sampling import SamplingConfig, full_tokens, generate, left_pad, train_layout


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
  """B = P·G sequences of L = prompt width + N slots; per-slot arrays describe the token AT that slot."""
  tokens: jax.Array  # [B, L]
  positions: jax.Array  # [B, L]
  segment_ids: jax.Array  # [B, L] (-1 on left padding)
  mask: jax.Array  # [B, L] 1 on generated tokens
  sampler_logp: jax.Array  # [B, L] log μ of the generated token at the slot, 0 elsewhere
  kept_ids: jax.Array  # [B, L, K_max] the kept set it was drawn from, -1 elsewhere
  experts: dict[int, jax.Array]  # MoE layer -> [B, L, k], experts the sampler used at every slot
  advantages: jax.Array  # [B]
  rewards: jax.Array  # [B]
  old_logp: jax.Array | None = None  # [B, L-1] π_old, filled by `grpo_step.score` at rollout time
  ref_logp: jax.Array | None = None  # [B, L-1] π_ref, likewise


jax.tree_util.register_dataclass(
    RolloutBatch, data_fields=["tokens", "positions", "segment_ids", "mask", "sampler_logp", "kept_ids", "experts",
                               "advantages", "rewards", "old_logp", "ref_logp"], meta_fields=[])


def draw_prompts(task: Task, rng: np.random.Generator, num_prompts: int) -> tuple[list[str], list[str]]:
  """num_prompts (prompt, answer) texts from the task."""
  pairs = [task.make_prompt(rng) for _ in range(num_prompts)]
  return [p for p, _ in pairs], [a for _, a in pairs]


def completion_text(tokenizer: Tokenizer, tokens: np.ndarray, mask: np.ndarray) -> str:
  """Decoded generated tokens before EOS."""
  ids = [int(t) for t, m in zip(tokens, mask) if m and t != tokenizer.eos_id]
  return tokenizer.decode(ids)


def rollout(cfg: ModelConfig, params: nnx.State, task: Task, tokenizer: Tokenizer, prompts: list[str],
            answers: list[str], *, group_size: int, prompt_width: int, sampling: SamplingConfig, rng: jax.Array,
            normalize_std: bool = False) -> tuple[RolloutBatch, list[str]]:
  """Samples `group_size` completions of every prompt with the model `cfg` (the sampler's dtype)."""
  ids = [tokenizer.encode(p) for p in prompts for _ in range(group_size)]
  prompt_ids, lengths = left_pad(ids, prompt_width, tokenizer.pad_id)
  out = generate(cfg, params, prompt_ids, lengths, rng, sampling)
  tokens_bn, mask_bn = np.asarray(out.tokens), np.asarray(out.mask)
  texts = [completion_text(tokenizer, t, m) for t, m in zip(tokens_bn, mask_bn)]
  rewards = np.asarray([task.reward(t, answers[i // group_size]) for i, t in enumerate(texts)], np.float32)
  adv = group_advantages(jnp.asarray(rewards).reshape(len(prompts), group_size), normalize_std=normalize_std)
  b, p = prompt_ids.shape
  positions, segments = train_layout(lengths, p, p + sampling.max_new_tokens)
  before = lambda x, fill: jnp.concatenate([jnp.full((b, p) + x.shape[2:], fill, x.dtype), x], axis=1)
  batch = RolloutBatch(full_tokens(out), positions, segments, before(out.mask, 0), before(out.logprobs, 0.0),
                       before(out.kept_ids, -1), out.experts, adv.reshape(-1), jnp.asarray(rewards))
  return batch, texts
