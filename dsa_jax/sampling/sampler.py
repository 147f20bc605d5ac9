"""Batched generation through the latent/indexer caches, recording what GRPO's stabilisers need.

DeepSeek-V3.2 §3.1 ("Keep Routing", "Keep Sampling Mask"): for every generated token the sampler returns
the token, its log-probability under the sampler μ (over the truncated, renormalised distribution it drew
from), the kept set of top-k/top-p as [B, N, K_max] ids padded with -1 (`sampling.sampling_mask`), and the
experts chosen at every MoE layer, for the prompt tokens as well, so the trainer can replay all of them.

Padding convention: prompts are LEFT-padded to one width P. Padded slots get segment id -1 (invisible to
every real token) and each sequence's real tokens get positions 0, 1, ..., so all sequences write the same
cache slot at every step and each attends to exactly the keys of its own unpadded forward. The trainer
reproduces this with `train_layout` on the [B, P + N] sequence `full_tokens`.

One jitted function: a prefill, then a `lax.while_loop` of single-token decode steps that stops when every
sequence has emitted EOS or N tokens were generated. After EOS a sequence emits `pad_id`, mask 0.
`generate` checks the prompts before it (`check_prompts`): inside the loop a bad id would be clamped by the
embedding gather and a position beyond `max_position` would run on without a word.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax.model import functional, kv_cache
from dsa_jax.model.config import ModelConfig
from dsa_jax.sampling.sampling_mask import kept_log_softmax, sample_from_kept, top_k_top_p_kept_ids
from dsa_jax.validation import check_int_range, is_concrete

PAD_SEGMENT = -1


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Decoding settings; `k_max` is the width of the recorded kept set (top-k is capped by it). Temperature 0
  is greedy decoding: the argmax at every step (top_k and top_p are then unused), with log μ = 0."""
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int | None = None
  k_max: int = 64
  eos_id: int = 0
  pad_id: int = 0
  attention: str = "sparse"

  def __post_init__(self):
    if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens!r} is invalid; allowed: >= 1.")
    if not self.temperature >= 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature!r} is invalid; allowed: >= 0 (0: greedy).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p={self.top_p!r} is invalid; allowed: 0 < top_p <= 1.")
    if not (isinstance(self.k_max, int) and self.k_max >= 1):
      raise ValueError(f"SamplingConfig.k_max={self.k_max!r} is invalid; allowed: an integer >= 1.")
    if self.top_k is not None and not 1 <= self.top_k <= self.k_max:
      raise ValueError(f"SamplingConfig.top_k={self.top_k!r} is invalid; allowed: None or 1..k_max={self.k_max}.")


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated tokens [B, N] and, aligned with them, what the sampler saw; experts over [B, P + N]."""
  tokens: jax.Array  # [B, N] int32, pad_id after a sequence stopped
  logprobs: jax.Array  # [B, N] fp32 log μ(token), 0 where mask is 0
  kept_ids: jax.Array  # [B, N, K_max] int32, -1 padded (all -1 where mask is 0)
  mask: jax.Array  # [B, N] int32, 1 on generated tokens (EOS included)
  lengths: jax.Array  # [B] number of generated tokens
  experts: dict[int, jax.Array]  # MoE layer -> [B, P + N, k] experts of every prompt and generated slot
  prompt_tokens: jax.Array  # [B, P] the left-padded prompts
  prompt_lengths: jax.Array  # [B]


jax.tree_util.register_dataclass(
    SampleOutput, data_fields=["tokens", "logprobs", "kept_ids", "mask", "lengths", "experts", "prompt_tokens",
                               "prompt_lengths"], meta_fields=[])


def left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Token lists -> (ids [B, width] left-padded with pad_id, lengths [B])."""
  if not prompts:
    raise ValueError("prompts is empty; allowed: at least one prompt.")
  if any(len(p) > width or not p for p in prompts):
    raise ValueError(f"prompt lengths {[len(p) for p in prompts]} are invalid; allowed: 1..width={width}.")
  ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
  return jnp.asarray(ids, jnp.int32), jnp.asarray([len(p) for p in prompts], jnp.int32)


def train_layout(prompt_lengths: jax.Array, prompt_width: int, total: int) -> tuple[jax.Array, jax.Array]:
  """Positions and segment ids [B, total] of a left-padded sequence (pads: position 0, segment -1)."""
  slots = jnp.arange(total, dtype=jnp.int32)[None]
  pad = (prompt_width - prompt_lengths)[:, None]
  real = slots >= pad
  return jnp.where(real, slots - pad, 0), jnp.where(real, 0, PAD_SEGMENT).astype(jnp.int32)


def _moe_experts(cfg: ModelConfig, out) -> dict[int, jax.Array]:
  return {i: out.layer_aux[i].moe.experts for i in range(cfg.num_layers) if cfg.is_moe_layer(i)}


def draw(rng, logits_bv, sampling: SamplingConfig):
  """One token per row from the truncated distribution -> (token, log μ(token), kept ids [B, K]); greedy (a
  kept set of the argmax alone) at temperature 0."""
  greedy = sampling.temperature == 0
  scaled_bv = logits_bv.astype(jnp.float32) / (1.0 if greedy else sampling.temperature)
  kept_bk = top_k_top_p_kept_ids(scaled_bv, k_max=sampling.k_max, top_k=1 if greedy else sampling.top_k,
                                 top_p=1.0 if greedy else sampling.top_p)
  token_b = sample_from_kept(rng, scaled_bv, kept_bk)
  return token_b, kept_log_softmax(scaled_bv, kept_bk, token_b), kept_bk


def check_prompts(cfg: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                  sampling: SamplingConfig) -> None:
  """Raises ValueError on an empty batch or prompt, ids outside the vocabulary (pads included), a pad id
  outside it, and prompts whose generation would pass `max_position`. Values are read only when concrete
  (`validation.is_concrete`); traced prompts get the shape checks and the static bound P + N."""
  shape = tuple(prompt_tokens.shape)
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"prompt_tokens has shape {shape}; allowed: [B, P] with B >= 1 and P >= 1.")
  if not 0 <= sampling.pad_id < cfg.vocab_size:
    raise ValueError(f"SamplingConfig.pad_id={sampling.pad_id} is invalid; allowed: 0 <= pad_id < "
                     f"ModelConfig.vocab_size={cfg.vocab_size}.")
  check_int_range("prompt_tokens", prompt_tokens, 0, cfg.vocab_size, "vocabulary")
  check_int_range("prompt_lengths", prompt_lengths, 1, shape[1] + 1, f"prompt lengths of width P={shape[1]}")
  longest = int(np.max(prompt_lengths)) if is_concrete(prompt_lengths) else shape[1]
  if longest + sampling.max_new_tokens > cfg.max_position:
    raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens={sampling.max_new_tokens} = "
                     f"{longest + sampling.max_new_tokens} positions exceed ModelConfig.max_position="
                     f"{cfg.max_position}; allowed: at most {cfg.max_position}.")


def generate(cfg: ModelConfig, params: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, sampling: SamplingConfig) -> SampleOutput:
  """Samples up to `sampling.max_new_tokens` tokens after left-padded prompts [B, P] (see module doc), once
  `check_prompts` passes."""
  check_prompts(cfg, prompt_tokens, prompt_lengths, sampling)
  return _generate(cfg, params, prompt_tokens, prompt_lengths, rng, sampling)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _generate(cfg: ModelConfig, params: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
              rng: jax.Array, sampling: SamplingConfig) -> SampleOutput:
  b, p = prompt_tokens.shape
  n = sampling.max_new_tokens
  run = functools.partial(functional.apply, cfg, params, attention=sampling.attention)
  positions, segments = train_layout(prompt_lengths, p, p)
  prefill = run(prompt_tokens, positions=positions, segment_ids=segments, cache=kv_cache.init_cache(cfg, b, p + n))
  experts = {i: jnp.zeros((b, p + n, e.shape[-1]), jnp.int32).at[:, :p].set(e)
             for i, e in _moe_experts(cfg, prefill).items()}
  carry = dict(i=jnp.zeros((), jnp.int32), rng=rng, logits=prefill.logits[:, -1], cache=prefill.cache,
               done=jnp.zeros((b,), bool), tokens=jnp.full((b, n), sampling.pad_id, jnp.int32),
               logprobs=jnp.zeros((b, n), jnp.float32), kept=jnp.full((b, n, sampling.k_max), -1, jnp.int32),
               mask=jnp.zeros((b, n), jnp.int32), experts=experts)

  def body(c):
    rng, step_rng = jax.random.split(c["rng"])
    token, logp, kept = draw(step_rng, c["logits"], sampling)
    live = ~c["done"]
    token = jnp.where(live, token, sampling.pad_id)
    out = run(token[:, None], positions=(prompt_lengths + c["i"])[:, None],
              segment_ids=jnp.zeros((b, 1), jnp.int32), cache=c["cache"])
    set_col = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v[:, None], c["i"], axis=1)
    return dict(
        i=c["i"] + 1, rng=rng, logits=out.logits[:, -1], cache=out.cache,
        done=c["done"] | (token == sampling.eos_id), tokens=set_col(c["tokens"], token),
        logprobs=set_col(c["logprobs"], jnp.where(live, logp, 0.0)),
        kept=set_col(c["kept"], jnp.where(live[:, None], kept, -1)), mask=set_col(c["mask"], live.astype(jnp.int32)),
        experts={i: jax.lax.dynamic_update_slice_in_dim(c["experts"][i], e, p + c["i"], axis=1)
                 for i, e in _moe_experts(cfg, out).items()})

  c = jax.lax.while_loop(lambda c: (c["i"] < n) & ~c["done"].all(), body, carry)
  return SampleOutput(c["tokens"], c["logprobs"], c["kept"], c["mask"], c["mask"].sum(-1), c["experts"],
                      prompt_tokens, prompt_lengths)


def full_tokens(out: SampleOutput) -> jax.Array:
  """[B, P + N]: the left-padded prompt followed by the generated tokens (the trainer's input)."""
  return jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
