"""Tokenizer round trips: the byte tokenizer and an HF tokenizer.json built here (no downloads)."""

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_jax.data.tokenizer import (
    BOS, DEEPSEEK_V32_SPECIAL_TOKENS, EOS, PAD, THINK_END, THINK_START, ByteTokenizer, HFTokenizer, check_vocab_fits,
)

# Text mixing ordinary characters with special strings, so splitting on specials is exercised.
TEXT_WITH_SPECIALS = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(DEEPSEEK_V32_SPECIAL_TOKENS)),
                              max_size=8).map("".join)


def build_hf_tokenizer_json(path: pathlib.Path) -> pathlib.Path:
  """A small byte-level BPE with the DeepSeek-V3.2 special tokens, trained on a few sentences."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(DEEPSEEK_V32_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = ["look up the key and follow the value", "<think>the record points on</think>ANSWER: v1"]
  tok.train_from_iterator(corpus * 20, trainer)
  tok.save(str(path))
  return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  return HFTokenizer(build_hf_tokenizer_json(tmp_path_factory.mktemp("hf") / "tokenizer.json"))


@given(TEXT_WITH_SPECIALS)
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  assert tok.decode(tok.encode(text)) == text


@given(TEXT_WITH_SPECIALS, TEXT_WITH_SPECIALS)
def test_byte_encoding_concatenates_at_special_boundaries(a, b):
  tok = ByteTokenizer()
  assert tok.encode(a + EOS + b) == tok.encode(a) + [tok.eos_id] + tok.encode(b)


def test_byte_special_tokens_are_single_ids_after_the_bytes():
  tok = ByteTokenizer()
  assert tok.vocab_size == 256 + len(DEEPSEEK_V32_SPECIAL_TOKENS)
  for special in DEEPSEEK_V32_SPECIAL_TOKENS:
    assert tok.encode(special) == [tok.token_id(special)]
    assert tok.token_id(special) >= 256
  assert tok.encode("é") == [0xC3, 0xA9]
  assert tok.encode(f"{BOS}a{THINK_START}b{THINK_END}") == [
      tok.bos_id, 97, tok.token_id(THINK_START), 98, tok.token_id(THINK_END)]
  assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3


def test_byte_tokenizer_is_general():
  tok = ByteTokenizer(special_tokens=("<s>", "</s>", "<pad>"), bos="<s>", eos="</s>", pad="<pad>")
  assert tok.vocab_size == 259
  assert tok.encode("<s>hi</s>") == [256, 104, 105, 257]


def test_byte_errors_name_the_value():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="'<nope>' is not a special token"):
    tok.token_id("<nope>")
  with pytest.raises(ValueError, match="token id 9999 is outside"):
    tok.decode([9999])
  with pytest.raises(ValueError, match="distinct"):
    ByteTokenizer(special_tokens=("<a>", "<a>"))


def test_byte_decode_tolerates_broken_utf8():
  assert ByteTokenizer().decode([0xC3]) == "\ufffd"


@settings(max_examples=50, deadline=None)
@given(TEXT_WITH_SPECIALS)
def test_hf_round_trip(hf_tokenizer, text):
  assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == text


def test_hf_special_tokens(hf_tokenizer):
  for special in DEEPSEEK_V32_SPECIAL_TOKENS:
    assert hf_tokenizer.encode(special) == [hf_tokenizer.token_id(special)]
  assert hf_tokenizer.bos_id == hf_tokenizer.token_id(BOS)
  assert hf_tokenizer.eos_id == hf_tokenizer.token_id(EOS)
  assert hf_tokenizer.pad_id == hf_tokenizer.token_id(PAD)
  assert hf_tokenizer.encode("abc")[0] != hf_tokenizer.bos_id  # no BOS added
  assert 256 + len(DEEPSEEK_V32_SPECIAL_TOKENS) < hf_tokenizer.vocab_size <= 400
  with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
    hf_tokenizer.token_id("<nope>")


@pytest.fixture(scope="module")
def byte_as_hf(tmp_path_factory):
  path = tmp_path_factory.mktemp("byte_json") / "tokenizer.json"
  path.write_text(ByteTokenizer().to_hf_json())
  return HFTokenizer(path)


@settings(max_examples=100, deadline=None)
@given(TEXT_WITH_SPECIALS, st.lists(st.integers(0, 256 + len(DEEPSEEK_V32_SPECIAL_TOKENS) - 1), max_size=12))
def test_byte_tokenizer_exported_as_tokenizer_json_is_the_same_tokenizer(byte_as_hf, text, ids):
  """An exported run's tokenizer.json (HF `tokenizers`) encodes and decodes exactly as the byte tokenizer."""
  tok = ByteTokenizer()
  assert byte_as_hf.encode(text) == tok.encode(text)
  assert byte_as_hf.decode(ids) == tok.decode(ids)  # broken UTF-8 included
  assert (byte_as_hf.vocab_size, byte_as_hf.bos_id, byte_as_hf.eos_id, byte_as_hf.pad_id) == (
      tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)


def test_hf_tokenizer_json_round_trips(hf_tokenizer, tmp_path):
  (tmp_path / "tokenizer.json").write_text(hf_tokenizer.to_hf_json())
  again = HFTokenizer(tmp_path / "tokenizer.json")
  assert again.encode("look up the key<think>") == hf_tokenizer.encode("look up the key<think>")


@pytest.mark.parametrize("content", [None, "{not json", '{"model": {"type": "Nope"}}'])
def test_hf_missing_or_malformed_file_names_the_path(tmp_path, content):
  path = tmp_path / "tokenizer.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ValueError, match=f"tokenizer.json {path} .*allowed: a HuggingFace tokenizers JSON file"):
    HFTokenizer(path)


@given(TEXT_WITH_SPECIALS)
def test_byte_encode_plain_never_yields_special_ids(text):
  tok = ByteTokenizer()
  ids = tok.encode_plain(text)
  assert max(ids, default=0) < 256 and tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(TEXT_WITH_SPECIALS)
def test_hf_encode_plain_never_yields_special_ids(hf_tokenizer, text):
  specials = {hf_tokenizer.token_id(s) for s in DEEPSEEK_V32_SPECIAL_TOKENS}
  ids = hf_tokenizer.encode_plain(text)
  assert not specials & set(ids) and hf_tokenizer.decode(ids) == text


def test_check_vocab_fits(hf_tokenizer):
  check_vocab_fits(ByteTokenizer(), 512, "ModelConfig.vocab_size")
  with pytest.raises(ValueError, match=r"tokenizer vocab_size=\d+ exceeds ModelConfig.vocab_size=300; allowed: "
                                       r"a tokenizer of at most 300 ids"):
    check_vocab_fits(hf_tokenizer, 300, "ModelConfig.vocab_size")
