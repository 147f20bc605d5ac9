"""The sampler as an agent `GenerateFn` (`dsa_jax.agent.rollout`): one prompt in, one `Generation` out.

Each generated token carries what GRPO needs downstream (DeepSeek-V3.2 §3.1): its sampler log-prob, its
kept set (a tuple of token ids, Keep Sampling Mask) and its experts ({MoE layer: tuple of ids}, Keep
Routing). Prompts are left-padded to a multiple of `bucket` tokens so that a growing context recompiles
`generate` only when it crosses a bucket; the number of new tokens is capped by `sampling.max_new_tokens`.
Only the first stop id is used as EOS (the DeepSeek-V3.2 format has one, `<｜end▁of▁sentence｜>`).
"""

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from dsa_jax.agent.rollout import Generation
from dsa_jax.model.config import ModelConfig
from dsa_jax.sampling.sampler import SamplingConfig, generate, left_pad


class SamplerGenerateFn:
  """Calls `generate` for one sequence; the RNG advances with every call."""

  def __init__(self, cfg: ModelConfig, params: nnx.State, sampling: SamplingConfig, seed: int = 0,
               bucket: int = 128, pad_id: int = 0):
    self.cfg, self.params, self.sampling, self.bucket, self.pad_id = cfg, params, sampling, bucket, pad_id
    self.rng = jax.random.key(seed)

  def __call__(self, prompt_tokens: list[int], max_new_tokens: int, stop_ids: Sequence[int]) -> Generation:
    width = -(-len(prompt_tokens) // self.bucket) * self.bucket
    ids, lengths = left_pad([list(prompt_tokens)], width, self.pad_id)
    sampling = dataclasses.replace(self.sampling, eos_id=int(stop_ids[0]) if stop_ids else -1)
    self.rng, rng = jax.random.split(self.rng)
    out = generate(self.cfg, self.params, ids, lengths, rng, sampling)
    n = min(int(out.lengths[0]), max_new_tokens)
    tokens, logprobs, kept = (np.asarray(x[0, :n]) for x in (out.tokens, out.logprobs, out.kept_ids))
    experts = {i: np.asarray(e[0, width:width + n]) for i, e in out.experts.items()}
    return Generation(
        tokens=[int(t) for t in tokens], logprobs=[float(x) for x in logprobs],
        kept_sets=[tuple(int(v) for v in row if v >= 0) for row in kept],
        routes=[{i: tuple(int(v) for v in e[j]) for i, e in experts.items()} for j in range(n)])
