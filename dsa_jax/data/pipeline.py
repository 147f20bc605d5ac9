"""The training input pipeline (Grain): documents -> token ids (+ retrieval examples mixed in at a set
rate) -> packed rows of a fixed length with per-document segment ids and positions -> batches.

Packing is Grain's concat-then-split: documents are concatenated and cut at `seq_len`; each row carries
`segment_ids` (1, 2, ... per document piece in the row) and `positions` (restarting at 0 for each
document), which the model's attention and indexer use to keep documents apart. The iterator is a Grain
`DatasetIterator`: `get_state()` / `set_state()` make it part of a checkpoint.

On several hosts each process reads only its shard of the documents (a disjoint slice of one seeded
shuffle) and packs them into its own rows of the global batch (`DataConfig.shard`); its iterator state is
then its own, saved per process (`training.checkpointing`).
"""

import dataclasses
import pathlib

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


class _ToTokens(grain.transforms.MapWithIndex):
  """Document i -> {"tokens", "loss_mask"}; with probability `rate` a retrieval example built on it. A long
  document is cut to a random window of characters (`corpus.clip`), then of `max_doc_tokens` tokens."""

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
    self.cfg, self.tokenizer = cfg, tokenizer

  def map_with_index(self, index: int, doc: str) -> dict[str, np.ndarray]:
    shard, count = self.cfg.shard  # the index in the one-host stream keeps every host's draws apart
    rng = np.random.default_rng([self.cfg.seed, index * count + shard])
    ids = self.tokenizer.encode(corpus.clip(doc, self.cfg.max_doc_tokens, rng))
    if len(ids) > self.cfg.max_doc_tokens:
      start = int(rng.integers(len(ids) - self.cfg.max_doc_tokens))
      ids = ids[start:start + self.cfg.max_doc_tokens]
    if rng.random() < self.cfg.retrieval.rate:
      ids = make_example(rng, ids, self.cfg.seq_len - 1, self.tokenizer, self.cfg.retrieval).ids.tolist()
    tokens = np.asarray([self.tokenizer.bos_id] + ids, np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


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
