"""Decoding with the MTP block as a one-token draft that the main model verifies (issue 23, item 4).

DeepSeek-V3 paper section 2.2 (MTP of depth 1; section 5.4.3 reports 85-90% acceptance of the second token on
the full model). The MTP block at position i reads the main model's last hidden state h_i and the embedding of
token i + 1 and predicts token i + 2. Per step, with the pending token t (drawn, not yet fed) at position p and
the draft d for position p + 1:
  1. the main model runs [t, d] at positions p, p + 1 through its cache (one forward of 2 query rows);
  2. a token y0 is drawn from row 0 (the argmax at temperature 0); d is accepted iff y0 == d, and then row 1's
     logits are the true next distribution, so y1 is drawn from them: the step emits y0 (and y1 if accepted);
  3. the MTP block runs both rows (h_p with y0, h_{p+1} with y1) through its own cache; the draft of the next
     step is the argmax of the row of the last accepted token;
  4. rejected rows forget slot p + 1 in both caches: its position becomes UNWRITTEN_POSITION (invisible to every
     query), and when every row rejected `length` steps back too, so the next step overwrites it. Otherwise
     the slot stays a hole of that row (all rows write the same slot, `kv_cache`), hence P + 2(N - 1) slots.
Each emitted token is drawn from exactly the distribution plain decoding draws it from (`sampler.draw`: the
same temperature, top-k and top-p), so the output is distributed as `sampler.generate`'s, and at temperature 0
it is the same tokens up to float rounding of near-ties (the 2-row forward and the longer cache round
differently). At temperature > 0 this is not Leviathan et al.'s (2023) rule, which accepts d with
probability min(1, p(d) / q(d)) and would need the draft's distribution q: matching a draw accepts less
often (p(d) instead of min(1, p(d) / q(d))) but needs no residual distribution and keeps the recorded
log-probabilities and kept sets those of the main model's draw.

Limits: no MoE routing record (rollouts for GRPO's Keep Routing use `sampler.generate`); the bf16 unpaged
cache of `kv_cache`; the draft is always the MTP block's argmax.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax.model import functional, kv_cache
from dsa_jax.model.config import ModelConfig
from dsa_jax.model.kv_cache import KVCache, LayerCache
from dsa_jax.model.mla import AttentionOptions
from dsa_jax.sampling.sampler import SamplingConfig, check_prompts, draw, train_layout


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
  """Generated tokens as `sampler.SampleOutput` has them (no experts), and the draft accounting."""
  tokens: jax.Array  # [B, N] int32, pad_id after a sequence stopped
  logprobs: jax.Array  # [B, N] fp32 log μ(token), 0 where mask is 0
  kept_ids: jax.Array  # [B, N, K_max] int32, -1 padded
  mask: jax.Array  # [B, N] int32, 1 on generated tokens (EOS included)
  lengths: jax.Array  # [B] number of generated tokens
  drafts: jax.Array  # [B] drafts verified while the sequence could still take two tokens
  accepted: jax.Array  # [B] of these, the drafts emitted as tokens
  steps: jax.Array  # int32 scalar: verification forwards run (the whole batch steps together)

  @property
  def acceptance_rate(self) -> jax.Array:
    return self.accepted.sum() / jnp.maximum(self.drafts.sum(), 1)


jax.tree_util.register_dataclass(
    SpeculativeOutput, data_fields=["tokens", "logprobs", "kept_ids", "mask", "lengths", "drafts", "accepted", "steps"],
    meta_fields=[])


def mtp_logits(cfg: ModelConfig, params: nnx.State, hidden: jax.Array, next_ids: jax.Array, positions: jax.Array,
               segment_ids: jax.Array, cache: KVCache, mtp_cache: LayerCache,
               attention: str) -> tuple[jax.Array, LayerCache]:
  """The MTP block over T rows appended to its own cache -> (logits [B, T, V] of tokens i + 2, updated cache).

  hidden [B, T, D]: the main model's last hidden states of the rows; next_ids [B, T]: token i + 1 of each row.
  `cache` is the main cache after this forward wrote the same rows: the MTP cache's slots are the main cache's
  (same length, same rollbacks), so it shares the main cache's key positions and segment ids.
  """
  model = nnx.merge(functional.graphdef(cfg), params)
  layout = dataclasses.replace(model.layout(positions, segment_ids), kv_positions=cache.positions,
                               kv_segment_ids=cache.segment_ids)
  next_embeds = model.embed[...].astype(cfg.dtype)[next_ids]
  normed, aux = model.mtp(hidden, next_embeds, layout, AttentionOptions(kind=attention), cache=mtp_cache)
  return model.logits(normed), aux.attention.cache


def roll_back(cache: KVCache, mtp_cache: LayerCache, slot: jax.Array,
              rejected: jax.Array) -> tuple[KVCache, LayerCache]:
  """Forgets slot `slot` + 1 (the draft's) of the rows `rejected` [B] after a step wrote slots slot, slot + 1."""
  keep = cache.positions[:, slot + 1]
  positions = cache.positions.at[:, slot + 1].set(jnp.where(rejected, kv_cache.UNWRITTEN_POSITION, keep))
  length = slot + 2 - rejected.all().astype(jnp.int32)
  layers = tuple(dataclasses.replace(layer, length=length) for layer in cache.layers)
  return dataclasses.replace(cache, layers=layers, positions=positions), dataclasses.replace(mtp_cache, length=length)


def check_model(cfg: ModelConfig) -> None:
  if cfg.num_mtp_layers != 1:
    raise ValueError(f"speculative decoding needs the MTP block: ModelConfig.num_mtp_layers={cfg.num_mtp_layers}; "
                     "allowed: 1 (load the checkpoint with include_mtp=True).")


def generate(cfg: ModelConfig, params: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, sampling: SamplingConfig) -> SpeculativeOutput:
  """`sampler.generate` with MTP drafts (module docstring): left-padded prompts [B, P], up to
  `sampling.max_new_tokens` tokens each, once `sampler.check_prompts` passes (a step runs only while a row has
  room for a token, so the draft's position never passes the last token's)."""
  check_model(cfg)
  check_prompts(cfg, prompt_tokens, prompt_lengths, sampling)
  return _generate(cfg, params, prompt_tokens, prompt_lengths, rng, sampling)


def _emit(buf: jax.Array, col: jax.Array, value: jax.Array, write: jax.Array) -> jax.Array:
  """buf [B, N, ...] with value [B, ...] written at column col [B] of the rows `write` [B]."""
  col = jnp.where(write, col, buf.shape[1])  # out of range: dropped
  return buf.at[jnp.arange(buf.shape[0]), col].set(value, mode="drop")


def prefill(cfg: ModelConfig, params: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            rng: jax.Array, sampling: SamplingConfig) -> dict:
  """Prompts through the main model and the MTP block -> the loop state: the first token drawn and emitted,
  the first draft, both caches (P + 2(N - 1) slots), per-row position of the pending token and counters."""
  b, p = prompt_tokens.shape
  n = sampling.max_new_tokens
  positions, segments = train_layout(prompt_lengths, p, p)
  cache = kv_cache.init_cache(cfg, b, p + 2 * (n - 1))
  # One decoder layer's cache shaped like the main cache's layers (first_k_dense only keeps the config valid).
  mtp_cache = kv_cache.init_cache(cfg.replace(num_layers=1, first_k_dense=0), b, p + 2 * (n - 1)).layers[0]
  out = functional.apply(cfg, params, prompt_tokens, attention=sampling.attention, positions=positions,
                         segment_ids=segments, cache=cache)
  rng, first_rng = jax.random.split(rng)
  token, logp, kept = draw(first_rng, out.logits[:, -1], sampling)
  next_ids = jnp.concatenate([prompt_tokens[:, 1:], token[:, None]], axis=1)
  draft_logits, mtp_cache = mtp_logits(cfg, params, out.hidden_states[-1], next_ids, positions, segments, out.cache,
                                       mtp_cache, sampling.attention)
  zeros = jnp.zeros((b,), jnp.int32)
  return dict(
      rng=rng, cache=out.cache, mtp_cache=mtp_cache, pending=token, draft=draft_logits[:, -1].argmax(-1),
      position=prompt_lengths.astype(jnp.int32), count=zeros + 1, done=token == sampling.eos_id,
      tokens=jnp.full((b, n), sampling.pad_id, jnp.int32).at[:, 0].set(token),
      logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp),
      kept=jnp.full((b, n, sampling.k_max), -1, jnp.int32).at[:, 0].set(kept),
      drafts=zeros, accepted=zeros, steps=jnp.zeros((), jnp.int32))


def step(cfg: ModelConfig, params: nnx.State, c: dict, sampling: SamplingConfig) -> tuple[dict, jax.Array]:
  """One verification step of every row (module docstring, 1-4) -> (the next loop state, the main model's
  logits [B, 2, V] of the two rows: row 1 is meaningful only where the draft was accepted)."""
  b, n = c["tokens"].shape
  rng, step_rng = jax.random.split(c["rng"])
  live = ~c["done"] & (c["count"] < n)
  positions = c["position"][:, None] + jnp.arange(2, dtype=jnp.int32)
  segments = jnp.zeros((b, 2), jnp.int32)
  slot = c["cache"].length
  out = functional.apply(cfg, params, jnp.stack([c["pending"], c["draft"]], axis=1), attention=sampling.attention,
                         positions=positions, segment_ids=segments, cache=c["cache"])
  token, logp, kept = draw(step_rng, out.logits, sampling)  # [B, 2] each (row 1 used only on acceptance)
  match = token[:, 0] == c["draft"]
  room = live & (c["count"] + 1 < n)
  second = room & match & (token[:, 0] != sampling.eos_id)
  draft_logits, mtp_cache = mtp_logits(cfg, params, out.hidden_states[-1], token, positions, segments, out.cache,
                                       c["mtp_cache"], sampling.attention)
  cache, mtp_cache = roll_back(out.cache, mtp_cache, slot, ~(match & live))  # finished rows keep nothing
  last = match.astype(jnp.int32)  # the row of the last token in the cache
  pick = lambda x: jnp.take_along_axis(x, last[:, None], axis=1)[:, 0]
  tokens, logprobs, kept_ids = c["tokens"], c["logprobs"], c["kept"]
  for row, write in ((0, live), (1, second)):
    col = c["count"] + row
    tokens = _emit(tokens, col, token[:, row], write)
    logprobs = _emit(logprobs, col, logp[:, row], write)
    kept_ids = _emit(kept_ids, col, kept[:, row], write)
  emitted = live.astype(jnp.int32) + second.astype(jnp.int32)
  ended = jnp.where(second, token[:, 1], token[:, 0]) == sampling.eos_id  # token 0 is EOS: no second token
  state = dict(
      rng=rng, cache=cache, mtp_cache=mtp_cache, pending=pick(token), draft=pick(draft_logits.argmax(-1)),
      position=c["position"] + jnp.where(live, 1 + last, 0), count=c["count"] + emitted,
      done=c["done"] | (live & ended), tokens=tokens, logprobs=logprobs, kept=kept_ids,
      drafts=c["drafts"] + room.astype(jnp.int32), accepted=c["accepted"] + second.astype(jnp.int32),
      steps=c["steps"] + 1)
  return state, out.logits


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _generate(cfg: ModelConfig, params: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
              rng: jax.Array, sampling: SamplingConfig) -> SpeculativeOutput:
  n = sampling.max_new_tokens
  c = jax.lax.while_loop(lambda c: (~c["done"] & (c["count"] < n)).any(),
                         lambda c: step(cfg, params, c, sampling)[0],
                         prefill(cfg, params, prompt_tokens, prompt_lengths, rng, sampling))
  mask = (jnp.arange(n)[None] < c["count"][:, None]).astype(jnp.int32)
  return SpeculativeOutput(c["tokens"], c["logprobs"], c["kept"], mask, c["count"], c["drafts"], c["accepted"],
                           c["steps"])
