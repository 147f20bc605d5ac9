"""Bad input files fail with the file, the line and what is allowed; a huge document is cut before the
tokenizer sees it; too few documents for the held-out split say so."""

import numpy as np
import pytest

from dsa_jax.data import corpus, pipeline, retrieval
from dsa_jax.data.tokenizer import ByteTokenizer

ALLOWED_JSONL = r"allowed: one JSON object per line with a string 'text' field"


@pytest.mark.parametrize("name, content, message", [
    ("data.bin", b"ab\ncd\x00\x01",
     r"data.bin line 2: a NUL byte at column 3 \(a binary file\); allowed: UTF-8 text"),
    ("bad.txt", b"ok\nfine\nab\xffc\n", r"bad.txt line 3: invalid UTF-8 \(byte 0xff at column 3\); allowed: UTF-8 text"),
    ("a.jsonl", b'{"text": "x"}\n{"text": \n', rf"a.jsonl line 2: not JSON \(.*\); {ALLOWED_JSONL}"),
    ("a.jsonl", b'{"text": "x"}\n\n{"body": "y"}\n', rf"a.jsonl line 3: no 'text' field; {ALLOWED_JSONL}"),
    ("a.jsonl", b'{"text": 5}\n', rf"a.jsonl line 1: 'text' is int \(5\); {ALLOWED_JSONL}"),
    ("a.jsonl", b'["text"]\n', rf"a.jsonl line 1: a list, not an object; {ALLOWED_JSONL}"),
    ("a.jsonl", b'{"text": "x"}\n{"text": "\xc3("}\n', r"a.jsonl line 2: invalid UTF-8 \(byte 0xc3 at column 11\)"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=message) as error:
    corpus.read_documents([tmp_path / name])
  assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_good_files_still_read(tmp_path):
  (tmp_path / "a.txt").write_text("héllo\nworld\n")
  (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
  assert corpus.read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["héllo\nworld\n", "one", "two"]


def test_too_few_documents_for_the_held_out_split_say_so(tmp_path):
  files = []
  for i in range(5):
    files.append(str(tmp_path / f"{i}.txt"))
    (tmp_path / f"{i}.txt").write_text(f"document {i}")
  with pytest.raises(ValueError, match=r"DataConfig.files: 5 documents leave 0 for the held-out split \(every 20th "
                                       r"document, eval_fraction=0.05\) and 5 for training; allowed: at least 20 "
                                       r"documents \(non-blank files or .jsonl lines\), or a larger eval_fraction"):
    pipeline.documents(pipeline.DataConfig(files=tuple(files)))
  train, held_out = pipeline.documents(pipeline.DataConfig(files=tuple(files), eval_fraction=0.25))
  assert len(train) == 4 and len(held_out) == 1


class _Recording(ByteTokenizer):
  def __init__(self):
    super().__init__()
    self.lengths = []

  def encode(self, text):
    self.lengths.append(len(text))
    return super().encode(text)


def test_a_huge_document_is_cut_before_tokenizing():
  cfg = pipeline.DataConfig(seq_len=32, batch_size=1, max_doc_tokens=64, retrieval=retrieval.RetrievalConfig(rate=0))
  tok = _Recording()
  huge = "".join(chr(97 + i % 26) for i in range(10**6))
  row = pipeline._ToTokens(cfg, tok).map_with_index(0, huge)
  assert max(tok.lengths) == 64 * corpus.MAX_CHARS_PER_TOKEN and len(row["tokens"]) == 65
  assert tok.decode(row["tokens"][1:].tolist()) in huge
  tok.lengths.clear()
  examples = retrieval.eval_examples([huge], tok, 96, 2, retrieval.RetrievalConfig())
  assert len(examples) == 2 and max(tok.lengths) <= 96 * corpus.MAX_CHARS_PER_TOKEN
  assert np.all(examples[0].ids < tok.vocab_size)
  with pytest.raises(ValueError, match=r"docs is empty; allowed: at least one held-out document"):
    retrieval.eval_examples([], tok, 96, 2, retrieval.RetrievalConfig())
  with pytest.raises(ValueError, match=r"filler is empty; allowed: the token ids of a non-empty document"):
    retrieval.make_example(np.random.default_rng(0), [], 96, tok, retrieval.RetrievalConfig())
