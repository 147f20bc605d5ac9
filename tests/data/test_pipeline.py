"""The Grain pipeline: packing with segment ids and per-document positions, checkpointable iterator
state, the embedded corpus, and the retrieval examples with their evaluator."""

import json

import numpy as np
import pytest

from dsa_jax.data import corpus, pipeline, retrieval
from dsa_jax.data.tokenizer import ByteTokenizer

DOCS = ["alpha beta gamma " * 3, "x" * 5, "the quick brown fox jumps " * 4, "0123456789" * 9]


def _cfg(**changes):
  return pipeline.DataConfig(**{"seq_len": 32, "batch_size": 2, "retrieval": retrieval.RetrievalConfig(rate=0.0),
                                **changes})


def test_rows_pack_documents_with_segment_ids_and_restarting_positions():
  tok = ByteTokenizer()
  it = iter(pipeline.train_dataset(_cfg(), DOCS, tok))
  for _ in range(4):
    batch = next(it)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 32) for k in ("ids", "loss_mask", "segment_ids",
                                                                             "positions")}
    for ids, seg, pos in zip(batch["ids"], batch["segment_ids"], batch["positions"]):
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
      starts = np.flatnonzero(np.diff(seg)) + 1
      assert np.all(pos[starts] == 0) and np.all(ids[starts] == tok.bos_id)  # each new document starts anew
      same = np.diff(seg) == 0
      assert np.all(np.diff(pos)[same] == 1)


@pytest.mark.parametrize("shard", [{}, {"shard_index": 1, "shard_count": 2}], ids=["one_host", "host_1_of_2"])
def test_iterator_state_restores_the_exact_stream(shard):
  tok = ByteTokenizer()
  it = iter(pipeline.train_dataset(_cfg(**shard), DOCS, tok))
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["ids"] for _ in range(4)]
  fresh = iter(pipeline.train_dataset(_cfg(**shard), DOCS, tok))
  fresh.set_state(state)
  assert all(np.array_equal(a, next(fresh)["ids"]) for a in expected)


def test_retrieval_examples_are_mixed_in_whole_rows():
  tok = ByteTokenizer()
  it = iter(pipeline.train_dataset(_cfg(seq_len=96, retrieval=retrieval.RetrievalConfig(rate=1.0)), DOCS, tok))
  text = tok.decode(next(it)["ids"][0].tolist())
  assert "# value of key" in text and text.count("# key ") == 2


def test_retrieval_example_and_evaluator():
  tok = ByteTokenizer()
  cfg = retrieval.RetrievalConfig(num_pairs=3, digits=4)
  ex = retrieval.make_example(np.random.default_rng(0), tok.encode(DOCS[2]), 120, tok, cfg)
  text = tok.decode(ex.ids.tolist())
  answer = text[-4:]
  key = text.split("# value of key ")[1][:3]
  assert len(ex.ids) == 120 and ex.answer_len == 4 and f"# key {key} = {answer}" in text
  oracle = lambda ids: np.eye(tok.vocab_size)[np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)]
  assert retrieval.accuracy(oracle, [ex, ex], batch_size=2) == {"retrieval_exact": 1.0, "retrieval_token": 1.0}
  with pytest.raises(ValueError, match="too short"):
    retrieval.make_example(np.random.default_rng(0), [1, 2], 20, tok, cfg)


def test_default_corpus_is_the_standard_library_and_configs_validate(tmp_path):
  assert any(p.name == "json" or p.name == "os.py" for p in corpus.stdlib_files())
  (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
  assert corpus.read_documents([tmp_path / "a.jsonl"]) == ["one", "two"]
  with pytest.raises(ValueError, match="DataConfig.seq_len=0"):
    pipeline.DataConfig(seq_len=0)
  with pytest.raises(ValueError, match="RetrievalConfig.rate"):
    retrieval.RetrievalConfig(rate=2.0)


def test_two_simulated_hosts_read_disjoint_documents_that_together_make_one_hosts():
  docs = [f"document {i} " * 3 for i in range(11)]
  one = pipeline.host_documents(_cfg(batch_size=4, shard_index=0, shard_count=1), docs)
  hosts = [pipeline.host_documents(_cfg(batch_size=4, shard_index=i, shard_count=2), docs) for i in range(2)]
  shards = [set(h) for h in hosts]
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(one) == set(docs)
  again = pipeline.host_documents(_cfg(batch_size=4, shard_index=1, shard_count=2), docs)
  assert list(again) == list(hosts[1])  # deterministic given the seed
  tok = ByteTokenizer()
  for i in range(2):
    batch = next(iter(pipeline.train_dataset(_cfg(batch_size=4, shard_index=i, shard_count=2), docs, tok)))
    assert {v.shape for v in batch.values()} == {(2, 32)}  # this host's rows of the global batch of 4
  assert pipeline.DataConfig().shard == (0, 1)  # default: jax.process_index() / process_count()
  with pytest.raises(ValueError, match="shard_index/shard_count=0/3 are invalid"):
    _cfg(batch_size=4, shard_index=0, shard_count=3)
