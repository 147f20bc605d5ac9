"""MTP-drafted decoding: plain greedy decoding's tokens, exact rollback, draft accounting, the sampled distribution.

A vocabulary of 4 makes the random MTP block's drafts right often enough that every test sees both accepted
and rejected drafts (with 512 tokens a random draft is never right).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional, kv_cache
from dsa_jax.model.config import tiny
from dsa_jax.sampling import SamplingConfig, generate, left_pad, speculative, train_layout

CFG = tiny().replace(vocab_size=4)
PROMPTS = [[1, 3, 2], [3, 2, 1, 1, 2, 0], [2]]
WIDTH = 6
N = 14  # beyond index_topk = 8
GREEDY = SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=-1, k_max=4)


@functools.lru_cache(maxsize=None)
def _params():
  return jax.jit(functools.partial(functional.init, CFG, seed=1))()


def _prompts(prompts=PROMPTS):
  return left_pad(prompts, WIDTH, 0)


def _expected_accounting(tokens, lengths, prompt_lengths, n, eos_id):
  """(drafts, accepted) per row from one full forward with the MTP block over [prompt | plain greedy tokens]:
  with pending token y_j, the draft is the MTP argmax at y_{j-1}'s position (fed y_j), accepted iff it is y_{j+1}."""
  ids, _ = _prompts()
  seq = jnp.concatenate([ids, jnp.asarray(tokens)], axis=1)
  positions, segments = train_layout(prompt_lengths, WIDTH, seq.shape[1])
  out = jax.jit(functools.partial(functional.apply, CFG, with_mtp=True))(_params(), seq, positions=positions,
                                                                       segment_ids=segments)
  draft = np.asarray(out.mtp_logits.argmax(-1))
  drafts, accepted = [], []
  for b in range(len(tokens)):
    j, d, a = 0, 0, 0
    while j + 1 < n and tokens[b][j] != eos_id:
      room = j + 2 < n
      d += room
      if room and draft[b, WIDTH + j - 1] == tokens[b][j + 1]:
        a, j = a + 1, j + 2
      else:
        j += 1
    assert j + 1 == lengths[b]
    drafts.append(d)
    accepted.append(a)
  return np.asarray(drafts), np.asarray(accepted)


@pytest.mark.parametrize("eos", [False, True])
def test_greedy_tokens_equal_plain_decoding_and_drafts_are_counted(eos):
  ids, lengths = _prompts()
  sampling = GREEDY
  if eos:  # a token the first row emits a few tokens in: rows stop at different steps
    first = np.asarray(generate(CFG, _params(), ids, lengths, jax.random.key(0), GREEDY).tokens)[0]
    sampling = SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=int(first[3]), k_max=4, pad_id=3)
  plain = generate(CFG, _params(), ids, lengths, jax.random.key(0), sampling)
  spec = speculative.generate(CFG, _params(), ids, lengths, jax.random.key(0), sampling)
  for name in ("tokens", "mask", "lengths", "logprobs", "kept_ids"):
    np.testing.assert_array_equal(np.asarray(getattr(spec, name)), np.asarray(getattr(plain, name)), err_msg=name)
  if eos:
    assert int(plain.lengths.min()) < N
  drafts, accepted = _expected_accounting(np.asarray(plain.tokens), np.asarray(plain.lengths), lengths, N,
                                          sampling.eos_id)
  np.testing.assert_array_equal(np.asarray(spec.drafts), drafts)
  np.testing.assert_array_equal(np.asarray(spec.accepted), accepted)
  assert 0 < accepted.sum() < drafts.sum()  # both paths ran
  assert float(spec.acceptance_rate) == pytest.approx(accepted.sum() / drafts.sum())


def _assert_logits_of_plain_path(logits, counts, plain, prompts):
  """Row 0 of a step's logits equals the full forward's last logits over [prompt | the tokens emitted so far]
  (the pending token, fed this step, is the last of them)."""
  seqs = [prompt + list(plain[b, :count]) for b, (prompt, count) in enumerate(zip(prompts, counts))]
  width = max(len(seq) for seq in seqs)
  ids, lengths = left_pad(seqs, width, 0)
  positions, segments = train_layout(lengths, width, width)
  full = jax.jit(functools.partial(functional.forward, CFG))(_params(), ids, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, -1]), atol=2e-5, rtol=2e-5)


def test_rollback_restores_the_plain_path():
  """A step whose draft is wrong in row 0 and right in row 1: row 0 forgets the draft's slot (a hole), and the
  next step's logits are the full forward's for both rows; then a step where both rows reject: `length` steps
  back (no hole) and the step after is exact again."""
  prompts = PROMPTS[:2]
  ids, lengths = _prompts(prompts)
  plain = np.asarray(generate(CFG, _params(), ids, lengths, jax.random.key(0), GREEDY).tokens)
  prefill = jax.jit(speculative.prefill, static_argnames=("cfg", "sampling"))
  step = jax.jit(speculative.step, static_argnames=("cfg", "sampling"))
  state = prefill(CFG, _params(), ids, lengths, jax.random.key(0), GREEDY)
  state["draft"] = jnp.asarray([(plain[0, 1] + 1) % CFG.vocab_size, plain[1, 1]], jnp.int32)
  slot = int(state["cache"].length)
  state, _ = step(CFG, _params(), state, GREEDY)
  np.testing.assert_array_equal(np.asarray(state["count"]), [2, 3])
  assert int(state["cache"].length) == int(state["mtp_cache"].length) == slot + 2
  np.testing.assert_array_equal(np.asarray(state["cache"].positions[:, slot + 1]),
                                [kv_cache.UNWRITTEN_POSITION, len(prompts[1]) + 1])
  counts = np.asarray(state["count"])
  state, logits = step(CFG, _params(), state, GREEDY)
  _assert_logits_of_plain_path(logits, counts, plain, prompts)
  counts = np.asarray(state["count"])
  state["draft"] = jnp.asarray([(plain[b, c] + 1) % CFG.vocab_size for b, c in enumerate(counts)], jnp.int32)
  slot = int(state["cache"].length)
  state, _ = step(CFG, _params(), state, GREEDY)
  np.testing.assert_array_equal(np.asarray(state["count"]), counts + 1)
  assert int(state["cache"].length) == int(state["mtp_cache"].length) == slot + 1
  assert (np.asarray(state["cache"].positions[:, slot + 1]) == kv_cache.UNWRITTEN_POSITION).all()
  counts = np.asarray(state["count"])
  _, logits = step(CFG, _params(), state, GREEDY)
  _assert_logits_of_plain_path(logits, counts, plain, prompts)


def test_sampled_distribution_is_plain_decodings():
  """Temperature 0.1 on a 4-token vocabulary (at 1 the random model is near uniform): the joint frequency of
  the first three tokens over 4000 rows is within 4.5 standard errors of the model's own probability for each
  of the 64 sequences."""
  rows, n, temperature = 4000, 3, 0.1
  sampling = SamplingConfig(max_new_tokens=n, temperature=temperature, eos_id=-1, k_max=4)
  prompt = [1, 3, 2]
  ids, lengths = left_pad([prompt] * rows, 3, 0)
  out = speculative.generate(CFG, _params(), ids, lengths, jax.random.key(7), sampling)
  assert 0 < int(out.accepted.sum()) < int(out.drafts.sum())
  counts = np.zeros((4,) * n)
  np.add.at(counts, tuple(np.asarray(out.tokens).T), 1)
  seqs = jnp.asarray([prompt + list(s) for s in itertools.product(range(4), repeat=n - 1)])
  logp = jax.nn.log_softmax(functional.forward(CFG, _params(), seqs)[:, 2:] / temperature, axis=-1)  # [16, 3, V]
  probs = np.zeros((4,) * n)
  for i, s in enumerate(itertools.product(range(4), repeat=n - 1)):
    for last in range(4):
      probs[s + (last,)] = np.exp(float(logp[i, 0, s[0]] + logp[i, 1, s[1]] + logp[i, 2, last]))
  assert probs.sum() == pytest.approx(1.0, abs=1e-5)
  bound = 4.5 * np.sqrt(probs * (1 - probs) / rows) + 1 / rows
  error = np.abs(counts / rows - probs)
  assert (error <= bound).all(), f"largest deviation {error.max():.4f}, bound there {bound.flat[error.argmax()]:.4f}"


def test_errors_name_the_field_and_the_allowed_values():
  ids, lengths = _prompts()
  with pytest.raises(ValueError, match=r"num_mtp_layers=0; allowed: 1"):
    speculative.generate(CFG.replace(num_mtp_layers=0), _params(), ids, lengths, jax.random.key(0), GREEDY)
  long = SamplingConfig(max_new_tokens=CFG.max_position - 5, temperature=0.0)
  with pytest.raises(ValueError, match=r"257 positions exceed ModelConfig.max_position=256"):
    speculative.generate(CFG, _params(), ids, lengths, jax.random.key(0), long)
