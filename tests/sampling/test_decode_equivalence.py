"""Decoding through the latent/indexer caches equals the full forward, position by position (spec §1)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional, kv_cache
from dsa_jax.model.config import tiny
from dsa_jax.sampling import left_pad, train_layout

CFG = tiny()  # index_topk = 8, so 20 tokens run well beyond it
SEQS = [list(np.random.default_rng(0).integers(1, CFG.vocab_size, 20)),
        list(np.random.default_rng(1).integers(1, CFG.vocab_size, 16))]
PROMPT_LENS = (5, 9)


@jax.jit
def _params():
  return functional.init(CFG, seed=3)


def cached_logits(cfg, params, seqs, prompt_lens, attention, mla_mode=None):
  """Prefill the left-padded prompts, then feed the rest one token per step (the sampler's layout) -> (logits
  [B, total, V], prompt lengths, prompt width)."""
  b, width = len(seqs), max(prompt_lens)
  total = width + max(len(s) - p for s, p in zip(seqs, prompt_lens))
  prompts, lengths = left_pad([s[:p] for s, p in zip(seqs, prompt_lens)], width, 0)
  rest = jnp.asarray([s[p:] + [0] * (total - width - len(s) + p) for s, p in zip(seqs, prompt_lens)], jnp.int32)
  positions, segments = train_layout(lengths, width, total)
  run = jax.jit(lambda ids, pos, seg, cache: functional.apply(cfg, params, ids, attention=attention, mla_mode=mla_mode,
                                                              positions=pos, segment_ids=seg, cache=cache))
  out = run(prompts, positions[:, :width], segments[:, :width], kv_cache.init_cache(cfg, b, total))
  logits, cache = [out.logits], out.cache
  for j in range(total - width):
    out = run(rest[:, j:j + 1], positions[:, width + j:width + j + 1], segments[:, width + j:width + j + 1], cache)
    logits.append(out.logits)
    cache = out.cache
  return jnp.concatenate(logits, axis=1), lengths, width


@pytest.mark.parametrize("attention,mla_mode", [("sparse", None), ("dense", "mqa"), ("dense", "mha")])
def test_decode_equals_full_forward(attention, mla_mode):
  params = _params()
  cached, lengths, width = cached_logits(CFG, params, SEQS, PROMPT_LENS, attention, mla_mode)
  for b, seq in enumerate(SEQS):
    full = functional.forward(CFG, params, jnp.asarray([seq]), attention=attention, mla_mode=mla_mode)[0]
    start = width - int(lengths[b])
    chex.assert_trees_all_close(cached[b, start:start + len(seq)], full, atol=2e-5, rtol=2e-5)
