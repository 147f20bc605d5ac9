"""Retrieval examples: single- and multi-hop lookups, needle depth, pair counts, the length curriculum in the
pipeline, and the config errors."""

import re

import numpy as np
import pytest

from dsa_jax.data import pipeline, retrieval
from dsa_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
FILLER = TOK.encode("lorem ipsum dolor sit amet " * 40)
DOCS = [f"def f{i}(x):\n  return x + {i}\n" * 30 for i in range(12)]


def _text(ex: retrieval.Example) -> str:
  return TOK.decode(ex.ids.tolist())


def _oracle(ids):
  return np.eye(TOK.vocab_size)[np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)]


@pytest.mark.parametrize("hops,pairs", [(1, 1), (1, 16), (2, 4), (3, 4)])
def test_a_lookup_of_h_hops_follows_its_chain_to_the_answer(hops, pairs):
  cfg = retrieval.RetrievalConfig(num_pairs=pairs, hops=hops, digits=2, key_letters=2, max_depth=0.9)
  ex = retrieval.make_example(np.random.default_rng(hops), FILLER, 400, TOK, cfg)
  text = _text(ex)
  table = dict(re.findall(r"\n# key ([A-Z]{2}) = (\w+)\n", text))
  assert len(table) == pairs and len(ex.ids) == 400
  question = re.search(r"\n# ((?:value of )+)key ([A-Z]{2}) is $", text[:ex.answer_start])
  assert question and question.group(1).count("value of") == hops
  value = question.group(2)
  for _ in range(hops):
    value = table[value]
  assert text[ex.answer_start:] == value and value.isdigit() and ex.answer_len == 2
  assert retrieval.accuracy(_oracle, [ex], batch_size=1) == {"retrieval_exact": 1.0, "retrieval_token": 1.0}


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_asked_needle_sits_at_the_given_depth(depth):
  cfg = retrieval.RetrievalConfig(num_pairs=4, max_depth=0.2)
  ex = retrieval.make_example(np.random.default_rng(0), FILLER, 600, TOK, cfg, depth=depth)
  text = _text(ex)
  key = re.search(r"key ([A-Z]{3}) is $", text[:ex.answer_start]).group(1)
  at = text.index(f"\n# key {key} = ")
  needles = sum(len(m) for m in re.findall(r"\n# key [A-Z]{3} = \d{3}\n", text))
  filler = len(text) - needles - len(text[text.rindex("\n# value"):])
  before = len(re.sub(r"\n# key [A-Z]{3} = \d{3}\n", "", text[:at]))  # filler tokens before the asked needle
  assert abs(before - depth * filler) <= 1
  others = [m.start() for m in re.finditer(r"\n# key ", text) if m.start() != at]
  assert all(len(re.sub(r"\n# key [A-Z]{3} = \d{3}\n", "", text[:o])) <= 0.2 * filler + 1 for o in others)


def test_varied_examples_draw_hops_and_pairs_within_their_ranges():
  cfg = retrieval.RetrievalConfig(num_pairs=6, hops=2, vary=True)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(40):
    text = _text(retrieval.make_example(rng, FILLER, 500, TOK, cfg))
    hops, pairs = text[text.rindex("\n# "):].count("value of"), text.count("\n# key ")
    assert 1 <= hops <= 2 and hops <= pairs <= 6
    seen.add((hops, pairs))
  assert {h for h, _ in seen} == {1, 2} and len({p for _, p in seen}) >= 4


@pytest.mark.parametrize("fields,match", [
    ({"hops": 3, "num_pairs": 2}, "RetrievalConfig.hops=3"),
    ({"max_depth": 1.5}, "RetrievalConfig.max_depth=1.5"),
    ({"key_letters": 1, "num_pairs": 16}, "RetrievalConfig.key_letters=1"),
    ({"lengths": (64, 128), "length_steps": (0,)}, "RetrievalConfig.length_steps"),
    ({"lengths": (64, 128), "length_steps": (5, 10)}, "0 first, then strictly ascending"),
    ({"lengths": (64, 0), "length_steps": (0, 10)}, "RetrievalConfig.lengths"),
])
def test_bad_retrieval_configs_name_the_field(fields, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    retrieval.RetrievalConfig(**fields)


def test_bad_depth_and_too_long_curriculum_lengths_are_refused():
  with pytest.raises(ValueError, match="depth=1.2"):
    retrieval.make_example(np.random.default_rng(0), FILLER, 200, TOK, retrieval.RetrievalConfig(), depth=1.2)
  with pytest.raises(ValueError, match=r"DataConfig.retrieval.lengths=\(64, 512\).*\[512\] exceed seq_len=256"):
    pipeline.DataConfig(seq_len=256, retrieval=retrieval.RetrievalConfig(lengths=(64, 512), length_steps=(0, 4)))


def test_curriculum_lengths_follow_the_steps():
  cfg = retrieval.RetrievalConfig(lengths=[64, 128, 256], length_steps=[0, 2, 5])
  assert [cfg.length_at(s, 999) for s in (1, 2, 3, 5, 6, 100)] == [64, 64, 128, 128, 256, 256]
  assert retrieval.RetrievalConfig().length_at(7, 999) == 999


def test_curriculum_rows_pack_whole_examples_of_their_steps_length_and_resume():
  retr = retrieval.RetrievalConfig(rate=1.0, num_pairs=1, lengths=(64, 128), length_steps=(0, 2))
  cfg = pipeline.DataConfig(seq_len=256, batch_size=2, retrieval=retr, max_doc_tokens=300)
  it = iter(pipeline.train_dataset(cfg, DOCS, TOK))
  for step, length in [(1, 64), (2, 64), (3, 128)]:
    batch = next(it)
    assert batch["ids"].shape == (2, 256)
    for row in range(2):
      seg, pos = batch["segment_ids"][row], batch["positions"][row]
      assert np.array_equal(seg, np.repeat(np.arange(1, 256 // length + 1), length)), step
      assert np.array_equal(pos, np.tile(np.arange(length), 256 // length))
      assert TOK.decode(batch["ids"][row].tolist()).count("# value of key") == 256 // length
  state = it.get_state()
  expected = next(it)["ids"]
  fresh = iter(pipeline.train_dataset(cfg, DOCS, TOK))
  fresh.set_state(state)
  assert np.array_equal(next(fresh)["ids"], expected)


def test_curriculum_text_rows_fill_the_row_with_documents():
  retr = retrieval.RetrievalConfig(rate=0.0, lengths=(64,), length_steps=(0,))
  batch = next(iter(pipeline.train_dataset(pipeline.DataConfig(seq_len=128, batch_size=1, retrieval=retr,
                                                                max_doc_tokens=50), DOCS, TOK)))
  seg = batch["segment_ids"][0]
  assert seg[0] == 1 and seg[-1] == 3 and np.all(np.diff(seg) >= 0)  # 51-token documents: three in 128
  assert "# key" not in TOK.decode(batch["ids"][0].tolist())


def test_lengths_too_short_for_the_needles_are_refused_at_config_time():
  retr = retrieval.RetrievalConfig(num_pairs=2, hops=2, digits=2, key_letters=2, lengths=(64, 128), length_steps=(0, 3))
  with pytest.raises(ValueError, match=r"DataConfig.retrieval.lengths=\(64, 128\).*64 tokens.*at least 65"):
    pipeline.DataConfig(seq_len=128, retrieval=retr)
  with pytest.raises(ValueError, match=r"DataConfig.seq_len=40 .*at least"):
    pipeline.DataConfig(seq_len=40, retrieval=retrieval.RetrievalConfig(rate=0.5))
  pipeline.DataConfig(seq_len=40, retrieval=retrieval.RetrievalConfig(rate=0.0))  # no examples: no bound
  longest = retrieval.RetrievalConfig(num_pairs=2, hops=2, digits=2, key_letters=2)
  rng = np.random.default_rng(0)
  retrieval.make_example(rng, FILLER, longest.min_length() - 1, TOK, longest)  # the bound is tight for bytes
  with pytest.raises(ValueError, match="too short"):
    retrieval.make_example(rng, FILLER, longest.min_length() - 2, TOK, longest)
