"""Continuous batching over the paged cache: sequences end and new ones start between decode steps.

A host loop around one jitted decode step of a fixed number of batch slots (`BatcherConfig.slots`), all
sequences sharing one page pool (`dsa_jax.model.paged_cache`). Between steps the loop
  * retires the sequences that emitted EOS or `max_new_tokens` tokens and returns their pages to the pool;
  * admits queued prompts into free slots: it maps the pages of the prompt and of its longest completion, then
    prefills the prompt alone (the ordinary forward, right-padded to a multiple of `prompt_bucket` tokens so
    that prompt lengths share compilations) and writes its entries to the pool.
A free slot's block table row is unmapped: the step writes nothing for it and its output is dropped.

Pages are reserved for the longest completion when a prompt is admitted, so a running sequence never waits for
a page and nothing is ever preempted; the price is pool space held by sequences that stop early at EOS (they
return it when they stop). A prompt waits in the queue until its pages are free.

Limits: each step reads the sampled tokens back to the host (the loop decides who ends); the loop returns the
tokens and log-probabilities of each prompt, not the experts and kept sets that `sampler.generate` records for
GRPO, and prompts are prefilled one at a time.
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax.model import functional, paged_cache
from dsa_jax.model.config import ModelConfig
from dsa_jax.sampling.sampler import SamplingConfig, draw
from dsa_jax.validation import check_field, check_positive


@dataclasses.dataclass(frozen=True)
class BatcherConfig:
  """Batch slots, the page pool (pages, tokens per page, entry dtype) and the prefill padding bucket."""
  slots: int = 8
  num_pages: int = 1024
  page_size: int = paged_cache.DEFAULT_PAGE_SIZE
  kv_dtype: str = "float8_e4m3fn"
  prompt_bucket: int = 64

  def __post_init__(self):
    check_positive(self, "slots", "num_pages", "page_size", "prompt_bucket")
    check_field(self.kv_dtype in paged_cache.KV_DTYPES, "BatcherConfig.kv_dtype", self.kv_dtype,
                str(paged_cache.KV_DTYPES))


@dataclasses.dataclass(frozen=True)
class Completion:
  """One prompt's generated tokens (EOS included when emitted) and their log-probabilities under the sampler."""
  tokens: list[int]
  logprobs: list[float]


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _prefill(cfg: ModelConfig, sampling: SamplingConfig, params: nnx.State, cache: paged_cache.PagedKVCache,
             ids: jax.Array, length: jax.Array, block_row: jax.Array, rng: jax.Array):
  """One right-padded prompt [1, W] of `length` tokens -> (first token, its log μ, cache with its entries)."""
  out = functional.apply(cfg, params, ids, attention=sampling.attention, mqa_operands=True)
  cache = cache.write(paged_cache.entries(out), jnp.arange(ids.shape[1])[None], block_row)
  token, logp, _ = draw(rng, jax.lax.dynamic_slice_in_dim(out.logits[0], length - 1, 1), sampling)
  return token[0], logp[0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("cache",))
def _decode_step(cfg: ModelConfig, sampling: SamplingConfig, params: nnx.State, cache: paged_cache.PagedKVCache,
                 tokens: jax.Array, positions: jax.Array, rng: jax.Array):
  """tokens, positions [slots] -> (next tokens [slots], their log μ, the updated cache)."""
  out = functional.apply(cfg, params, tokens[:, None], attention=sampling.attention, positions=positions[:, None],
                         cache=cache)
  token, logp, _ = draw(rng, out.logits[:, -1], sampling)
  return token, logp, out.cache


def _check_prompts(cfg: ModelConfig, prompts: list[list[int]], sampling: SamplingConfig, batcher: BatcherConfig,
                   pages: int) -> None:
  if not prompts:
    raise ValueError("prompts is empty; allowed: at least one prompt.")
  for i, prompt in enumerate(prompts):
    if not prompt or min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
      raise ValueError(f"prompts[{i}] (length {len(prompt)}) is invalid; allowed: 1 or more ids in 0..vocab_size-1="
                       f"{cfg.vocab_size - 1}.")
    if len(prompt) + sampling.max_new_tokens > cfg.max_position:
      raise ValueError(f"prompts[{i}] has {len(prompt)} tokens + max_new_tokens={sampling.max_new_tokens}, more "
                       f"than ModelConfig.max_position={cfg.max_position}; allowed: at most {cfg.max_position}.")
  if pages > batcher.num_pages:
    raise ValueError(f"the longest prompt and its completion need {pages} pages of {batcher.page_size} tokens; "
                     f"allowed: BatcherConfig.num_pages={batcher.num_pages} >= {pages}.")


def generate_continuous(cfg: ModelConfig, params: nnx.State, prompts: list[list[int]], rng: jax.Array,
                        sampling: SamplingConfig, batcher: BatcherConfig = BatcherConfig()) -> list[Completion]:
  """Samples up to `sampling.max_new_tokens` tokens after each prompt, `batcher.slots` sequences at a time
  (module docstring) -> one Completion per prompt, in the prompts' order."""
  n = sampling.max_new_tokens
  span = lambda prompt: len(prompt) + n - 1  # positions written: the prompt and every generated token but the last
  max_pages = -(-max(map(span, prompts), default=1) // batcher.page_size)
  _check_prompts(cfg, prompts, sampling, batcher, max_pages)
  alloc = paged_cache.PageAllocator(batcher.num_pages, batcher.page_size, batcher.slots, max_pages)
  cache = paged_cache.init_paged_cache(cfg, batch=batcher.slots, num_pages=batcher.num_pages, max_pages=max_pages,
                                       page_size=batcher.page_size, kv_dtype=batcher.kv_dtype)
  queue, live, done = collections.deque(range(len(prompts))), {}, [None] * len(prompts)

  def record(slot: int, index: int, token: int, logp: float) -> None:
    tokens, logprobs = live.setdefault(slot, (index, [], []))[1:]
    tokens.append(token)
    logprobs.append(logp)
    if token == sampling.eos_id or len(tokens) == n:
      done[index] = Completion(tokens, logprobs)
      alloc.free(slot)
      del live[slot]

  while queue or live:
    for slot in range(batcher.slots):
      if slot in live or not queue or alloc.pages_for(span(prompts[queue[0]])) > alloc.free_pages:
        continue
      index = queue.popleft()
      prompt = prompts[index]
      alloc.allocate(slot, span(prompt))
      width = -(-len(prompt) // batcher.prompt_bucket) * batcher.prompt_bucket
      rng, key = jax.random.split(rng)
      token, logp, cache = _prefill(cfg, sampling, params, cache, jnp.asarray([prompt + [0] * (width - len(prompt))]),
                                    len(prompt), alloc.block_table[slot:slot + 1], key)
      record(slot, index, int(token), float(logp))
    if not live:  # nothing runs, so every page is free: only a bug can leave the queued prompt out
      raise RuntimeError(f"prompts[{queue[0]}] was not admitted into a pool of {alloc.free_pages} free pages.")
    tokens, positions = np.zeros(batcher.slots, np.int32), np.zeros(batcher.slots, np.int32)
    for slot, (index, generated, _) in live.items():
      tokens[slot], positions[slot] = generated[-1], len(prompts[index]) + len(generated) - 1
    rng, key = jax.random.split(rng)
    token, logp, cache = _decode_step(cfg, sampling, params, cache.with_block_table(alloc.block_table), tokens,
                                      positions, key)
    token, logp = np.asarray(token), np.asarray(logp)
    for slot in list(live):
      record(slot, live[slot][0], int(token[slot]), float(logp[slot]))
  return done
