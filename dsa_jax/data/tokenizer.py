"""Tokenizers: a byte-level one with DeepSeek-V3.2 special tokens, and a wrapper for HF `tokenizer.json`.

The special strings are those of DeepSeek-V3.2's chat format (`encoding_dsv32.py` in the DeepSeek-V3.2
release; spec §4). `ByteTokenizer` maps UTF-8 bytes to ids 0..255 and every special string to one id after
the bytes; text is split on special strings first, so `encode(a + b) == encode(a) + encode(b)` whenever no
special string straddles the boundary. It is the tokenizer of the tests, the agent study and the training
data pipeline. `HFTokenizer` wraps a HuggingFace `tokenizer.json` (for example DeepSeek-V3.2's own) through
the `tokenizers` library.

`encode` turns special strings into their ids; `encode_plain` never does (the text of a special string
becomes ordinary tokens that decode to the same text). The chat format encodes everything a user or a
tool wrote with `encode_plain`, so such text cannot forge a role or end-of-turn marker.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Protocol, Sequence

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
PAD = "<｜▁pad▁｜>"
DSML = "｜DSML｜"
FUNCTION_CALLS_OPEN = f"<{DSML}function_calls>"
FUNCTION_CALLS_CLOSE = f"</{DSML}function_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"

DEEPSEEK_V32_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END,
    FUNCTION_CALLS_OPEN, FUNCTION_CALLS_CLOSE, INVOKE_OPEN, INVOKE_CLOSE, PARAMETER_OPEN, PARAMETER_CLOSE,
    PAD,
)


class Tokenizer(Protocol):
  """What the data pipeline and the agent need from a tokenizer."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special strings inside it become their single ids. Adds no BOS."""
    ...

  def encode_plain(self, text: str) -> list[int]:
    """Token ids of `text` as ordinary text: never a special id, even where it spells a special string."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens written out."""
    ...

  def token_id(self, special: str) -> int:
    """The id of one special string."""
    ...


class _SpecialIds:
  """bos/eos/pad ids that a concrete tokenizer resolves once in its constructor."""
  _bos: int
  _eos: int
  _pad: int

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad


class ByteTokenizer(_SpecialIds):
  """UTF-8 bytes are ids 0..255; `special_tokens[i]` is id 256 + i."""

  def __init__(self, special_tokens: Sequence[str] = DEEPSEEK_V32_SPECIAL_TOKENS,
               bos: str = BOS, eos: str = EOS, pad: str = PAD):
    if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
      raise ValueError(f"special_tokens must be distinct and non-empty, got {list(special_tokens)}")
    self._specials = tuple(special_tokens)
    self._special_ids = {s: 256 + i for i, s in enumerate(self._specials)}
    # Longest first, so a special string that contains another wins.
    alternation = "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
    self._split = re.compile(f"({alternation})")
    self._bos, self._eos, self._pad = self.token_id(bos), self.token_id(eos), self.token_id(pad)

  @property
  def vocab_size(self) -> int:
    return 256 + len(self._specials)

  @property
  def special_tokens(self) -> tuple[str, ...]:
    return self._specials

  def token_id(self, special: str) -> int:
    if special not in self._special_ids:
      raise ValueError(f"special={special!r} is not a special token; allowed: {list(self._specials)}")
    return self._special_ids[special]

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._special_ids:
        ids.append(self._special_ids[piece])
      else:
        ids.extend(piece.encode("utf-8"))
    return ids

  def to_hf_json(self) -> str:
    """This tokenizer as an HF `tokenizer.json` (what an exported checkpoint ships): a byte-level BPE without
    merges, so each byte is one token of the same id, and the special strings as added tokens after them."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers  # only the export needs the library
    from tokenizers import Tokenizer as HFTokenizerModel

    tok = HFTokenizerModel(models.BPE(vocab={char: b for b, char in _gpt2_byte_chars().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in self._specials])
    return tok.to_str()

  def encode_plain(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    pieces: list[str] = []
    pending = bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        pending.append(i)
        continue
      if not 256 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
      pieces.append(pending.decode("utf-8", errors="replace"))
      pending.clear()
      pieces.append(self._specials[i - 256])
    pieces.append(pending.decode("utf-8", errors="replace"))
    return "".join(pieces)


def _gpt2_byte_chars() -> dict[int, str]:
  """Byte -> the printable character that byte-level BPE (GPT-2, HF `ByteLevel`) writes for it."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class HFTokenizer(_SpecialIds):
  """A HuggingFace `tokenizer.json` behind the `Tokenizer` protocol.

  `encode` adds no template tokens (the chat format writes BOS itself) and `decode` keeps special tokens,
  so that the agent can parse them. `encode_plain` cuts every added token's text after its first character
  (whether the file marks the token special or not), so the pieces tokenize as ordinary text; an added
  token of a single character cannot be cut and is left as it is.
  """

  def __init__(self, path: str | pathlib.Path, bos: str = BOS, eos: str = EOS, pad: str = PAD):
    import tokenizers  # Imported here: only this class needs the library.

    path = pathlib.Path(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for a missing file and for bad JSON alike
      raise ValueError(f"tokenizer.json {path} could not be read ({e}); allowed: a HuggingFace tokenizers JSON "
                       "file") from e
    added = [t.content for t in self._tok.get_added_tokens_decoder().values() if len(t.content) > 1]
    alternation = "|".join(re.escape(s) for s in sorted(added, key=len, reverse=True))
    self._added = frozenset(added)
    self._split = re.compile(f"({alternation})") if added else None
    self._bos, self._eos, self._pad = self.token_id(bos), self.token_id(eos), self.token_id(pad)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_id(self, special: str) -> int:
    i = self._tok.token_to_id(special)
    if i is None:
      raise ValueError(f"special={special!r} is not in the tokenizer's vocabulary")
    return i

  def to_hf_json(self) -> str:
    return self._tok.to_str()

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_plain(self, text: str) -> list[int]:
    if self._split is None:
      return self.encode(text)
    ids: list[int] = []
    for piece in self._split.split(text):
      if piece in self._added:  # its first character alone, then the rest (which may hold another added token)
        ids += self.encode(piece[0]) + self.encode_plain(piece[1:])
      elif piece:
        ids += self.encode(piece)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


CONFIG_FILE = "tokenizer_config.json"  # HF's file naming the special tokens


def save_to_checkpoint(path: str | pathlib.Path, tokenizer: ByteTokenizer | HFTokenizer) -> None:
  """Writes `tokenizer.json` and `tokenizer_config.json` (bos/eos/pad strings) into a checkpoint directory."""
  path = pathlib.Path(path)
  (path / "tokenizer.json").write_text(tokenizer.to_hf_json())
  special = {f"{name}_token": tokenizer.decode([i]) for name, i in
             (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))}
  (path / CONFIG_FILE).write_text(json.dumps(special, indent=1, ensure_ascii=False))


def from_checkpoint(path: str | pathlib.Path) -> HFTokenizer | None:
  """The tokenizer a checkpoint directory ships (`tokenizer.json`, special tokens from `tokenizer_config.json`
  when given there, else DeepSeek-V3.2's), or None when it has none."""
  path = pathlib.Path(path)
  if not (path / "tokenizer.json").is_file():
    return None
  config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
  special = {}
  for name in ("bos", "eos", "pad"):
    value = config.get(f"{name}_token")
    value = value.get("content") if isinstance(value, dict) else value  # HF also writes {"content": ...}
    if value:
      special[name] = value
  return HFTokenizer(path / "tokenizer.json", **special)


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int, field: str) -> None:
  """Raises ValueError when the tokenizer can emit ids the model's embedding does not have (`field` names the
  model's vocabulary size, e.g. "ModelConfig.vocab_size")."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds {field}={vocab_size}; allowed: a "
                     f"tokenizer of at most {vocab_size} ids")
