"""The training input pipeline (Grain): documents -> token ids (+ retrieval examples mixed in at a set
rate) -> packed rows of a fixed length with per-document segment ids and positions -> batches.

Packing is Grain's concat-then-split: documents are concatenated and cut at `seq_len`; each row carries
`segment_ids` (1, 2, ... per document piece in the row) and `positions` (restarting at 0 for each
document), which the model's attention and indexer use to keep documents apart. The iterator is a Grain
`DatasetIterator`: `get_state()` / `set_state()` make it part of a checkpoint.

With a length curriculum (`RetrievalConfig.lengths`) rows are built one by one instead (`_CurriculumRow`): row r
belongs to step r // host_batch_size + 1, so its retrieval examples take that step's length; with probability
`rate` a row holds seq_len // length whole examples (each a document: its own segment), and text documents
fill the rest of every row.

On several hosts each process reads only its shard of the documents (a disjoint slice of one seeded
shuffle) and packs them into its own rows of the global batch (`DataConfig.shard`); its iterator state is
then its own, saved per process (`training.checkpointing`).
"""

import dataclasses
import pathlib
import sys

import grain
import jax
import numpy as np

from dsa_jax.data import corpus
from dsa_jax.data.retrieval import RetrievalConfig, make_example
from dsa_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from dsa_jax.validation import check_positive


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it is cut. `files` empty: the embedded standard-library corpus."""
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0
  files: tuple[str, ...] = ()
  tokenizer: str = "byte"  # "byte" or the path of an HF tokenizer.json
  max_doc_tokens: int = 4096  # long files are cut to a random window of this many tokens
  eval_fraction: float = 0.05
  retrieval: RetrievalConfig = RetrievalConfig()
  # This host's document shard and the number of shards (None: jax.process_index() / process_count()).
  # Hosts that hold the same rows of the global batch (e.g. a context axis across hosts) share a shard.
  shard_index: int | None = None
  shard_count: int | None = None

  def __post_init__(self):
    check_positive(self, "seq_len", "batch_size", "max_doc_tokens")
    if not 0.0 < self.eval_fraction < 0.5:
      raise ValueError(f"DataConfig.eval_fraction={self.eval_fraction!r} is invalid; allowed: 0 < x < 0.5.")
    if self.tokenizer != "byte" and not self.tokenizer.endswith(".json"):
      raise ValueError(f"DataConfig.tokenizer={self.tokenizer!r} is invalid; allowed: 'byte' or a tokenizer.json.")
    if (self.shard_index is None) != (self.shard_count is None):
      raise ValueError(f"DataConfig.shard_index/shard_count={self.shard_index!r}/{self.shard_count!r} are invalid; "
                       "allowed: both, or neither (this process's jax.process_index()/process_count()).")
    if self.shard_count is not None:
      self._check_shard(self.shard_index, self.shard_count)
    self._check_retrieval_lengths()

  def _check_retrieval_lengths(self) -> None:
    retr, need = self.retrieval, self.retrieval.min_length()
    what = f"{retr.num_pairs} needles and a {retr.hops}-hop question"
    short = [n for n in retr.lengths if n < need]
    if short:
      raise ValueError(f"DataConfig.retrieval.lengths={retr.lengths} is invalid: {short[0]} tokens cannot hold {what}; "
                       f"allowed: at least {need} tokens each (one per byte: RetrievalConfig.min_length).")
    if retr.rate > 0 and not retr.lengths and self.seq_len < need:
      raise ValueError(f"DataConfig.seq_len={self.seq_len} is invalid with retrieval.rate={retr.rate}: a row cannot "
                       f"hold {what}; allowed: at least {need} tokens, or retrieval.rate=0.")
    too_long = [n for n in self.retrieval.lengths if n > self.seq_len]
    if too_long:
      raise ValueError(f"DataConfig.retrieval.lengths={self.retrieval.lengths} is invalid: {too_long} exceed seq_len="
                       f"{self.seq_len}; allowed: example lengths <= seq_len (several short ones share a row).")

  def _check_shard(self, index: int, count: int) -> None:
    if not (isinstance(count, int) and count > 0 and self.batch_size % count == 0 and 0 <= index < count):
      raise ValueError(f"DataConfig.shard_index/shard_count={index!r}/{count!r} are invalid for batch_size="
                       f"{self.batch_size}; allowed: 0 <= shard_index < shard_count, shard_count a divisor of it.")

  @property
  def shard(self) -> tuple[int, int]:
    """(index, count) of this host's document shard, resolved late (after `jax.distributed.initialize`)."""
    if self.shard_count is not None:
      return self.shard_index, self.shard_count
    self._check_shard(jax.process_index(), jax.process_count())
    return jax.process_index(), jax.process_count()

  @property
  def host_batch_size(self) -> int:
    """Rows this host loads: its share of the global `batch_size`."""
    return self.batch_size // self.shard[1]


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
  return ByteTokenizer() if cfg.tokenizer == "byte" else HFTokenizer(pathlib.Path(cfg.tokenizer))


def documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
  """(train, eval) documents of the configured source; too few for both splits raise ValueError."""
  docs = corpus.read_documents(list(cfg.files) or corpus.stdlib_files())
  train, held_out = corpus.split_documents(docs, cfg.eval_fraction)
  if not train or not held_out:
    every = corpus.held_out_every(cfg.eval_fraction)
    raise ValueError(f"DataConfig.files: {len(docs)} documents leave {len(held_out)} for the held-out split (every "
                     f"{every}th document, eval_fraction={cfg.eval_fraction}) and {len(train)} for training; allowed: "
                     f"at least {every} documents (non-blank files or .jsonl lines), or a larger eval_fraction.")
  return train, held_out


def _document_ids(tokenizer: Tokenizer, doc: str, rng: np.random.Generator, limit: int) -> list[int]:
  """A document's token ids: a long one cut to a random window of characters (`corpus.clip`), then of `limit`
  tokens."""
  ids = tokenizer.encode(corpus.clip(doc, limit, rng))
  if len(ids) > limit:
    start = int(rng.integers(len(ids) - limit))
    ids = ids[start:start + limit]
  return ids


class _ToTokens(grain.transforms.MapWithIndex):
  """Document i -> {"tokens", "loss_mask"}; with probability `rate` a retrieval example built on it."""

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
    self.cfg, self.tokenizer = cfg, tokenizer

  def map_with_index(self, index: int, doc: str) -> dict[str, np.ndarray]:
    shard, count = self.cfg.shard  # the index in the one-host stream keeps every host's draws apart
    rng = np.random.default_rng([self.cfg.seed, index * count + shard])
    ids = _document_ids(self.tokenizer, doc, rng, self.cfg.max_doc_tokens)
    if rng.random() < self.cfg.retrieval.rate:
      ids = make_example(rng, ids, self.cfg.seq_len - 1, self.tokenizer, self.cfg.retrieval).ids.tolist()
    tokens = np.asarray([self.tokenizer.bos_id] + ids, np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


class _CurriculumRow(grain.transforms.MapWithIndex):
  """Row i of this host's stream -> one packed row (module docstring): retrieval examples of its step's
  curriculum length with probability `rate`, then text documents to the end."""

  def __init__(self, cfg: DataConfig, docs: list[str], tokenizer: Tokenizer):
    self.cfg, self.docs, self.tokenizer = cfg, docs, tokenizer

  def _document(self, rng: np.random.Generator, limit: int) -> list[int]:
    """A random document's window of at most `limit` tokens (only what the row can hold is tokenized)."""
    doc = self.docs[int(rng.integers(len(self.docs)))]
    return _document_ids(self.tokenizer, doc, rng, min(limit, self.cfg.max_doc_tokens))

  def map_with_index(self, index: int, _) -> dict[str, np.ndarray]:
    cfg, bos = self.cfg, self.tokenizer.bos_id
    shard, count = cfg.shard
    rng = np.random.default_rng([cfg.seed, index * count + shard])
    pieces = []
    if rng.random() < cfg.retrieval.rate:
      length = cfg.retrieval.length_at(index // cfg.host_batch_size + 1, cfg.seq_len)
      pieces = [[bos] + make_example(rng, self._document(rng, length), length - 1, self.tokenizer,
                                     cfg.retrieval).ids.tolist() for _ in range(cfg.seq_len // length)]
    while (free := cfg.seq_len - sum(map(len, pieces))) > 0:
      pieces.append([bos] + self._document(rng, free - 1 if free > 1 else 1))
    tokens = np.concatenate([np.asarray(p, np.int32) for p in pieces])[:cfg.seq_len]
    segment_ids = np.concatenate([np.full(len(p), i + 1, np.int32) for i, p in enumerate(pieces)])[:cfg.seq_len]
    positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in pieces])[:cfg.seq_len]
    return {"ids": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": segment_ids, "positions": positions}


def _to_batch(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"ids": row["tokens"], "loss_mask": row["loss_mask"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"]}


def host_documents(cfg: DataConfig, docs: list[str]) -> grain.MapDataset:
  """This host's documents, in order: a slice of one shuffle (same seed on every host), so the hosts'
  shards are disjoint and together hold every document once."""
  shard, count = cfg.shard
  if len(docs) < count:
    raise ValueError(f"{len(docs)} documents are too few for {count} data shards; allowed: at least one each.")
  return grain.MapDataset.source(docs).shuffle(seed=cfg.seed)[shard::count]


def train_dataset(cfg: DataConfig, docs: list[str], tokenizer: Tokenizer) -> grain.IterDataset:
  """An endless, shuffled, packed and batched dataset of this host's documents: batches of
  [host_batch_size, seq_len] int32 arrays."""
  if cfg.retrieval.lengths:
    rows = grain.MapDataset.range(sys.maxsize).map_with_index(_CurriculumRow(cfg, list(host_documents(cfg, docs)),
                                                                             tokenizer))
    return rows.to_iter_dataset().batch(cfg.host_batch_size, drop_remainder=True)
  ds = host_documents(cfg, docs).repeat(None).map_with_index(_ToTokens(cfg, tokenizer))
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": cfg.seq_len, "loss_mask": cfg.seq_len})
  return packed.map(_to_batch).batch(cfg.host_batch_size, drop_remainder=True)


def eval_batches(cfg: DataConfig, docs: list[str], tokenizer: Tokenizer, num_batches: int) -> list[dict]:
  """A fixed list of held-out LM batches (no retrieval examples) for dense-vs-sparse comparisons: the same
  whole batches on every host."""
  plain = dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, rate=0.0), seed=cfg.seed + 1,
                              shard_index=0, shard_count=1)
  it = iter(train_dataset(plain, docs, tokenizer))
  return [next(it) for _ in range(num_batches)]
