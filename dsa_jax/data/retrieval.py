"""Synthetic long-range retrieval: key-value lookups hidden in real text (passkey retrieval is the case
of one pair), in the spirit of the passkey test of Mohtashami & Jaggi (2023) and RULER's needles.

An example is `filler ... needle ... filler ... needle ... question answer`: each needle reads
"\n# key ABC = 1234\n" at a random depth, and the question at the end asks for one key's value. Only a
model that attends back to the right needle, possibly the whole sequence away, predicts the answer, so
the accuracy measures whether sparse attention keeps the long-range token that matters.
"""

import dataclasses
import string
from typing import Callable

import numpy as np

from dsa_jax.data.corpus import clip
from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.validation import check_positive


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """Synthetic examples: `num_pairs` needles of `digits`-digit values; `rate` of training documents."""
  rate: float = 0.25
  num_pairs: int = 2
  digits: int = 3

  def __post_init__(self):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"RetrievalConfig.rate={self.rate!r} is invalid; allowed: 0.0 <= rate <= 1.0.")
    check_positive(self, "num_pairs", "digits")


@dataclasses.dataclass(frozen=True)
class Example:
  """Token ids of one example and where its answer lies: ids[answer_start : answer_start + answer_len]."""
  ids: np.ndarray  # [L] int32
  answer_start: int
  answer_len: int


def make_example(rng: np.random.Generator, filler: list[int], length: int, tokenizer: Tokenizer,
                 cfg: RetrievalConfig) -> Example:
  """One example of exactly `length` tokens; filler tokens come from `filler` (cycled if short)."""
  if not len(filler):
    raise ValueError("filler is empty; allowed: the token ids of a non-empty document.")
  keys = ["".join(rng.choice(list(string.ascii_uppercase), 3)) for _ in range(cfg.num_pairs)]
  values = ["".join(rng.choice(list(string.digits), cfg.digits)) for _ in range(cfg.num_pairs)]
  asked = int(rng.integers(cfg.num_pairs))
  needles = [tokenizer.encode(f"\n# key {k} = {v}\n") for k, v in zip(keys, values)]
  question = tokenizer.encode(f"\n# value of key {keys[asked]} is ")
  answer = tokenizer.encode(values[asked])
  n_filler = length - sum(map(len, needles)) - len(question) - len(answer)
  if n_filler < 1:
    raise ValueError(f"length={length} is too short for {cfg.num_pairs} needles; allowed: a longer sequence.")
  start = int(rng.integers(max(1, len(filler))))
  text = [filler[(start + i) % len(filler)] for i in range(n_filler)]
  cuts = np.sort(rng.integers(0, n_filler // 2 + 1, cfg.num_pairs))  # needles in the first half: long range
  pieces, last = [], 0
  for cut, needle in zip(cuts, needles):
    pieces += [text[last:cut], needle]
    last = cut
  pieces += [text[last:], question, answer]
  ids = np.asarray([t for piece in pieces for t in piece], np.int32)
  return Example(ids, length - len(answer), len(answer))


def eval_examples(docs: list[str], tokenizer: Tokenizer, length: int, count: int, cfg: RetrievalConfig,
                  seed: int = 1234) -> list[Example]:
  """A fixed evaluation set of `count` examples over held-out documents (each cut to its first
  `length * corpus.MAX_CHARS_PER_TOKEN` characters before tokenizing)."""
  if not docs:
    raise ValueError(f"docs is empty; allowed: at least one held-out document for {count} retrieval examples.")
  rng = np.random.default_rng(seed)
  return [make_example(rng, tokenizer.encode(clip(docs[i % len(docs)], length)), length, tokenizer, cfg)
          for i in range(count)]


def accuracy(logits_fn: Callable[[np.ndarray], np.ndarray], examples: list[Example],
             batch_size: int) -> dict[str, float]:
  """Teacher-forced greedy accuracy: exact match (every answer token is the argmax) and per token.

  logits_fn maps ids [B, L] to logits [B, L, V]; exact match under teacher forcing equals greedy decoding.
  """
  exact, tokens, total = 0, 0, 0
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    preds = np.asarray(logits_fn(np.stack([e.ids for e in chunk]))).argmax(-1)
    for row, e in zip(preds, chunk):
      hit = row[e.answer_start - 1:e.answer_start - 1 + e.answer_len] == e.ids[e.answer_start:][:e.answer_len]
      exact += int(hit.all())
      tokens += int(hit.sum())
      total += e.answer_len
  return {"retrieval_exact": exact / len(examples), "retrieval_token": tokens / total}
