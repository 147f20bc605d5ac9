"""Text sources: the embedded default corpus (the Python standard library's own source files, present on
every machine that runs Python, so nothing is downloaded) and user text / JSONL files.

Bad input fails loudly, never skipped: a file with a NUL byte (binary), invalid UTF-8, a JSONL line that is
not a JSON object with a string "text" field each raise ValueError naming the file, the line and what is
allowed, so a corrupt shard is noticed before training rather than trained on or silently thinned.
`clip` bounds a document's text before tokenizing, so one huge line costs at most a fixed window.
"""

import json
import pathlib
import sysconfig

import numpy as np

# Characters kept per token wanted when a document is cut before tokenizing (`clip`): a byte is one token of
# the byte tokenizer and BPE tokens of text and code average well under 16 characters, so the window still
# yields the tokens asked for while a single huge line never reaches the tokenizer whole.
MAX_CHARS_PER_TOKEN = 16
_JSONL_ALLOWED = "allowed: one JSON object per line with a string 'text' field"


def stdlib_files() -> list[pathlib.Path]:
  """The top-level `*.py` files of this interpreter's standard library, sorted (a deterministic order)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.glob("*.py") if p.is_file())
  if not files:
    raise FileNotFoundError(f"no *.py files under the standard library directory {root}")
  return files


def _decode(path: pathlib.Path, data: bytes, first_line: int = 1) -> str:
  """`data` as UTF-8 text; a NUL byte or invalid UTF-8 raises ValueError naming the file, line and column."""
  nul = data.find(b"\0")
  if nul != -1:
    line, column = first_line + data.count(b"\n", 0, nul), nul - data.rfind(b"\n", 0, nul)
    raise ValueError(f"{path} line {line}: a NUL byte at column {column} (a binary file); allowed: UTF-8 text")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line, column = first_line + data.count(b"\n", 0, e.start), e.start - data.rfind(b"\n", 0, e.start)
    raise ValueError(f"{path} line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                     "allowed: UTF-8 text") from None


def _jsonl_text(path: pathlib.Path, number: int, raw: bytes) -> str:
  """The "text" field of line `number` of a JSONL file."""
  line = _decode(path, raw, number)
  try:
    record = json.loads(line)
  except ValueError as e:
    raise ValueError(f"{path} line {number}: not JSON ({e}); {_JSONL_ALLOWED}") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path} line {number}: a {type(record).__name__}, not an object; {_JSONL_ALLOWED}")
  if "text" not in record:
    raise ValueError(f"{path} line {number}: no 'text' field; {_JSONL_ALLOWED}")
  if not isinstance(record["text"], str):
    text = record["text"]
    raise ValueError(f"{path} line {number}: 'text' is {type(text).__name__} ({str(text)[:40]}); {_JSONL_ALLOWED}")
  return record["text"]


def read_documents(paths: list[pathlib.Path] | tuple[str, ...]) -> list[str]:
  """One document per text file; one per non-blank line of a `.jsonl` file (its "text" field). Blank
  documents are dropped; bad input raises (module docstring)."""
  docs = []
  for path in map(pathlib.Path, paths):
    if path.suffix == ".jsonl":
      with path.open("rb") as f:
        docs.extend(_jsonl_text(path, number, raw) for number, raw in enumerate(f, start=1) if raw.strip())
    else:
      docs.append(_decode(path, path.read_bytes()))
  return [d for d in docs if d.strip()]


def held_out_every(eval_fraction: float) -> int:
  """k of the split: every k-th document is held out."""
  return max(2, round(1 / eval_fraction))


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """(train, eval): every k-th document is held out, k = `held_out_every(eval_fraction)`."""
  every = held_out_every(eval_fraction)
  return ([d for i, d in enumerate(docs) if i % every != every - 1],
          [d for i, d in enumerate(docs) if i % every == every - 1])


def clip(text: str, max_tokens: int, rng: np.random.Generator | None = None) -> str:
  """`text`, or when longer than `max_tokens * MAX_CHARS_PER_TOKEN` characters a window of that many: at a
  random start drawn from `rng`, or the first ones without it."""
  limit = max_tokens * MAX_CHARS_PER_TOKEN
  if len(text) <= limit:
    return text
  start = 0 if rng is None else int(rng.integers(len(text) - limit + 1))
  return text[start:start + limit]
