"""Synthetic long-range retrieval: key-value lookups hidden in real text (passkey retrieval is the case
of one pair), in the spirit of the passkey test of Mohtashami & Jaggi (2023), associative recall (Ba et al.,
2016; Zoology, Arora et al. 2023) and RULER's needles (Hsieh et al., 2024).

An example is `filler ... needle ... filler ... needle ... question answer`: each needle reads
"\n# key ABC = 123\n" at some depth, and the question at the end asks for one key's value. Only a model that
attends back to the right needle, possibly the whole sequence away, predicts the answer, so the accuracy
measures whether sparse attention keeps the long-range token that matters.

Multi-hop (`hops` > 1): the asked key's value is another key ("# key ABC = QRS", "# key QRS = 417"), and the
question dereferences it `hops` times ("# value of value of key ABC is " -> 417): the model must find one
needle, then use what it read to find the next. Keys are `key_letters` capital letters and values `digits`
digits, a few tokens each under the byte tokenizer and most BPE ones.

The length curriculum (`lengths`, `length_steps`) makes the examples of training step s `lengths[i]` tokens
long, i the last index with `length_steps[i] <= s`; rows keep `DataConfig.seq_len`, several short examples
packed per row (`pipeline.train_dataset`), so the step compiles once for the whole curriculum.
"""

import dataclasses
import string
from typing import Callable

import numpy as np

from dsa_jax.data.corpus import clip
from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.validation import check_field, check_positive


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """Synthetic examples: `num_pairs` needles (keys of `key_letters` letters, values of `digits` digits), a
  `hops`-step lookup, the needles in the first `max_depth` of the filler; `rate` of training documents (rows,
  with a curriculum). `vary`: each training example draws its hops from 1..hops and its pairs from
  hops..num_pairs (a mixture); the evaluation grid sets both exactly."""
  rate: float = 0.25
  num_pairs: int = 2
  digits: int = 3
  key_letters: int = 3
  hops: int = 1
  max_depth: float = 0.5
  vary: bool = False
  lengths: tuple[int, ...] = ()  # curriculum: example lengths in tokens (empty: one example fills a row)
  length_steps: tuple[int, ...] = ()  # the first step of each length: 0, then ascending

  def __post_init__(self):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"RetrievalConfig.rate={self.rate!r} is invalid; allowed: 0.0 <= rate <= 1.0.")
    check_positive(self, "num_pairs", "digits", "key_letters", "hops")
    check_field(self.hops <= self.num_pairs, "RetrievalConfig.hops", self.hops,
                f"<= num_pairs={self.num_pairs} (a lookup of h hops reads h needles)")
    check_field(26 ** self.key_letters >= 2 * self.num_pairs, "RetrievalConfig.key_letters", self.key_letters,
                f"enough for {self.num_pairs} distinct keys (26**key_letters >= 2 * num_pairs)")
    check_field(0.0 <= self.max_depth <= 1.0, "RetrievalConfig.max_depth", self.max_depth, "0.0 <= max_depth <= 1.0")
    object.__setattr__(self, "lengths", tuple(self.lengths))  # a config file may give lists
    object.__setattr__(self, "length_steps", tuple(self.length_steps))
    check_field(len(self.lengths) == len(self.length_steps), "RetrievalConfig.length_steps", self.length_steps,
                f"one first step per length of lengths={self.lengths}")
    check_field(all(isinstance(n, int) and n > 0 for n in self.lengths), "RetrievalConfig.lengths", self.lengths,
                "positive integers (tokens per example)")
    steps = self.length_steps
    check_field(not steps or (steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:]))),
                "RetrievalConfig.length_steps", steps, "0 first, then strictly ascending integers")

  def min_length(self) -> int:
    """The shortest row piece (BOS + example) that holds the longest example of this config: `num_pairs` needles,
    a `hops`-hop question, the answer and one filler token, at one token per byte (an upper bound for the byte
    tokenizer, exact there, and for BPE ones)."""
    needle = len("\n# key  = \n") + self.key_letters + max(self.key_letters, self.digits)
    question = len("\n# key  is ") + len("value of ") * self.hops + self.key_letters
    return self.num_pairs * needle + question + self.digits + 2

  def final_length(self, row_len: int) -> int:
    """Tokens of an example at the curriculum's end (a row without one): the length evaluations use."""
    return self.lengths[-1] if self.lengths else row_len

  def describe(self, row_len: int) -> str:
    """The evaluation examples in words, e.g. "1-pair lookup in 64-token examples"."""
    hops = f", {self.hops}-hop" if self.hops > 1 else ""
    return f"{self.num_pairs}-pair{hops} lookup in {self.final_length(row_len)}-token examples"

  def length_at(self, step: int, row_len: int) -> int:
    """Tokens of a training example at `step` (1-based, as the loop counts): the curriculum's, else a row."""
    if not self.lengths:
      return row_len
    return self.lengths[int(np.searchsorted(self.length_steps, step - 1, side="right")) - 1]


@dataclasses.dataclass(frozen=True)
class Example:
  """Token ids of one example and where its answer lies: ids[answer_start : answer_start + answer_len]."""
  ids: np.ndarray  # [L] int32
  answer_start: int
  answer_len: int


def _keys(rng: np.random.Generator, count: int, letters: int) -> list[str]:
  keys: list[str] = []
  while len(keys) < count:
    key = "".join(rng.choice(list(string.ascii_uppercase), letters))
    keys += [key] if key not in keys else []
  return keys


def _needles(rng: np.random.Generator, cfg: RetrievalConfig, pairs: int, hops: int) -> tuple[list[str], str, str]:
  """(needle texts, question, answer) of a `hops`-step lookup among `pairs` needles; the first needle holds the
  asked key, the next `hops - 1` the rest of its chain, the others distractors."""
  keys = _keys(rng, pairs, cfg.key_letters)
  values = ["".join(rng.choice(list(string.digits), cfg.digits)) for _ in range(1 + pairs - hops)]
  chain = keys[:hops]  # chain[i]'s value is chain[i + 1]; the last one's is values[0]
  needles = [f"\n# key {k} = {v}\n" for k, v in zip(chain, chain[1:] + [values[0]])]
  needles += [f"\n# key {k} = {v}\n" for k, v in zip(keys[hops:], values[1:])]
  question = f"\n# {'value of ' * hops}key {chain[0]} is "
  return needles, question, values[0]


def make_example(rng: np.random.Generator, filler: list[int], length: int, tokenizer: Tokenizer,
                 cfg: RetrievalConfig, depth: float | None = None) -> Example:
  """One example of exactly `length` tokens; filler tokens come from `filler` (cycled if short).

  The needle of the asked key sits `depth` of the way through the filler (None: uniform in [0, max_depth]);
  the other needles uniformly in [0, max_depth]."""
  if not len(filler):
    raise ValueError("filler is empty; allowed: the token ids of a non-empty document.")
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ValueError(f"make_example depth={depth!r} is invalid; allowed: 0.0 <= depth <= 1.0.")
  hops = int(rng.integers(1, cfg.hops + 1)) if cfg.vary else cfg.hops
  pairs = int(rng.integers(hops, cfg.num_pairs + 1)) if cfg.vary else cfg.num_pairs
  texts, question_text, answer_text = _needles(rng, cfg, pairs, hops)
  needles = [tokenizer.encode(t) for t in texts]
  question, answer = tokenizer.encode(question_text), tokenizer.encode(answer_text)
  n_filler = length - sum(map(len, needles)) - len(question) - len(answer)
  if n_filler < 1:
    raise ValueError(f"length={length} is too short for {pairs} needles of {cfg.key_letters}-letter keys; allowed: "
                     f"at least {length - n_filler + 1} tokens.")
  start = int(rng.integers(max(1, len(filler))))
  text = [filler[(start + i) % len(filler)] for i in range(n_filler)]
  cuts = rng.integers(0, int(n_filler * cfg.max_depth) + 1, len(needles))
  if depth is not None:
    cuts[0] = round(n_filler * depth)
  order = np.argsort(cuts, kind="stable")
  pieces, last = [], 0
  for i in order:
    pieces += [text[last:cuts[i]], needles[i]]
    last = cuts[i]
  pieces += [text[last:], question, answer]
  ids = np.asarray([t for piece in pieces for t in piece], np.int32)
  return Example(ids, length - len(answer), len(answer))


def eval_examples(docs: list[str], tokenizer: Tokenizer, length: int, count: int, cfg: RetrievalConfig,
                  seed: int = 1234, depth: float | None = None) -> list[Example]:
  """A fixed evaluation set of `count` examples over held-out documents (each cut to its first
  `length * corpus.MAX_CHARS_PER_TOKEN` characters before tokenizing)."""
  if not docs:
    raise ValueError(f"docs is empty; allowed: at least one held-out document for {count} retrieval examples.")
  rng = np.random.default_rng(seed)
  return [make_example(rng, tokenizer.encode(clip(docs[i % len(docs)], length)), length, tokenizer, cfg, depth)
          for i in range(count)]


def exact_matches(logits_fn: Callable[[np.ndarray], np.ndarray], examples: list[Example],
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per example: (exact match, answer tokens right) under teacher forcing, as bool [n] and int [n].

  logits_fn maps ids [B, L] to logits [B, L, V]. Exact match under teacher forcing equals greedy decoding's:
  greedy decoding's first answer token is the argmax after the question, as here; while every token so far
  matched, greedy decoding's prefix is the teacher-forced one, so the next argmax is the same too; at the first
  mismatch both count the example wrong. Per-token counts are teacher-forced (they can exceed greedy's).
  """
  exact, tokens = [], []
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    preds = np.asarray(logits_fn(np.stack([e.ids for e in chunk]))).argmax(-1)
    for row, e in zip(preds, chunk):
      hit = row[e.answer_start - 1:e.answer_start - 1 + e.answer_len] == e.ids[e.answer_start:][:e.answer_len]
      exact.append(bool(hit.all()))
      tokens.append(int(hit.sum()))
  return np.asarray(exact, bool), np.asarray(tokens, np.int64)


def accuracy(logits_fn: Callable[[np.ndarray], np.ndarray], examples: list[Example],
             batch_size: int) -> dict[str, float]:
  """Teacher-forced greedy accuracy: exact match (every answer token is the argmax; `exact_matches` says why
  this equals greedy decoding's) and per token."""
  exact, tokens = exact_matches(logits_fn, examples, batch_size)
  total = sum(e.answer_len for e in examples)
  return {"retrieval_exact": float(exact.mean()), "retrieval_token": float(tokens.sum() / total)}
