"""Minimal safetensors reader/writer on numpy memory maps, for checkpoint files that are untrusted input.

Why not `safetensors.numpy`: numpy has no float8/bfloat16, so it cannot open DeepSeek's FP8 checkpoints.
This reader maps the file and views each tensor with its `ml_dtypes` type, so a tensor is read from disk
only when (and as far as) it is sliced — the 671B checkpoint never has to sit in host memory.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw data.

Untrusted input: every file must resolve inside the checkpoint directory (an HF hub snapshot may link into its
cached repository's `blobs/`), only regular files are opened (opening a FIFO would block), and each header is
checked against its file before any tensor is read — JSON without duplicate keys, known dtypes, shapes of
non-negative ints, data offsets inside the data section, disjoint and exactly shape x itemsize long. Errors are
one-line `CheckpointError`s naming the file and tensor.
"""

import contextlib
import json
import math
import os
import pathlib
import stat
import struct

import ml_dtypes
import numpy as np

from dsa_jax.checkpoint import CheckpointError
from dsa_jax.validation import check_field

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
MAX_JSON_BYTES = 100_000_000  # a header or config.json beyond is refused (the safetensors reference's limit)


@contextlib.contextmanager
def naming(path: pathlib.Path):
  """Turns a ValueError raised inside into a CheckpointError whose message starts with `path`."""
  try:
    yield
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e


def open_regular(path: pathlib.Path):
  """open(path, "rb") for a regular file; anything else is refused before it is opened (a FIFO would block)."""
  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    raise CheckpointError(f"{path}: not a regular file (mode {stat.filemode(mode)}); only regular files are read.")
  return open(path, "rb")


class _DuplicateKey(Exception):
  pass


def _unique_keys(pairs: list) -> dict:
  """A json object_pairs_hook that refuses duplicate keys (json.loads would keep the last one silently)."""
  obj = dict(pairs)
  if len(obj) < len(pairs):
    seen = set()
    raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
  return obj


def parse_json(raw: bytes, what: str) -> dict:
  """A JSON object from untrusted bytes (UTF-8, no duplicate keys); ValueError naming `what` otherwise."""
  check_field(len(raw) <= MAX_JSON_BYTES, f"size of the {what}", len(raw), f"<= {MAX_JSON_BYTES} bytes")
  try:
    value = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
  except _DuplicateKey as e:
    raise ValueError(f"{what} has duplicate key {e.args[0]!r}; allowed: unique keys.") from None
  except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, ints of thousands of digits, deep nesting
    raise ValueError(f"{what} is not JSON ({e}).") from None
  if not isinstance(value, dict):
    raise ValueError(f"{what} is a {type(value).__name__}; allowed: a JSON object.")
  return value


def read_json(path: pathlib.Path) -> dict:
  """A JSON object file (config.json, the index) read as untrusted input."""
  with naming(path), open_regular(path) as f:
    return parse_json(f.read(MAX_JSON_BYTES + 1), "the file")


def is_int(value, low: float = 0) -> bool:
  """value is an int (not a bool) >= low."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_header(header: dict, data_bytes: int) -> None:
  """Each entry's dtype, shape and data offsets against the data section; ValueError naming the tensor."""
  spans = []
  for name, info in header.items():
    check_field(isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info), f"tensor {name!r}",
                info, "an object with dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    check_field(isinstance(dtype, str) and dtype in DTYPES, f"tensor {name!r} dtype", dtype, str(sorted(DTYPES)))
    check_field(isinstance(shape, list) and all(is_int(n) for n in shape), f"tensor {name!r} shape", shape,
                "a list of non-negative ints")
    check_field(isinstance(offsets, list) and len(offsets) == 2 and all(is_int(n) for n in offsets) and
                offsets[0] <= offsets[1], f"tensor {name!r} data_offsets", offsets, "[begin, end], 0 <= begin <= end")
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    check_field(offsets[1] - offsets[0] == nbytes, f"tensor {name!r} data_offsets", offsets,
                f"a span of {nbytes} bytes (shape {shape} x {np.dtype(DTYPES[dtype]).itemsize})")
    if offsets[1] > data_bytes:
      raise ValueError(f"tensor {name!r} data_offsets={offsets} reach past the end of the data section "
                       f"({data_bytes} bytes): the file is truncated.")
    spans.append((offsets[0], offsets[1], name))
  spans.sort()
  for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
    if begin < end:
      raise ValueError(f"tensors {a!r} and {b!r} overlap (data_offsets {header[a]['data_offsets']} and "
                       f"{header[b]['data_offsets']}); allowed: disjoint spans.")


class SafetensorsFile:
  """One .safetensors file: header parsed and checked eagerly, data memory-mapped lazily."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    with naming(path), open_regular(path) as f:
      size = os.fstat(f.fileno()).st_size
      check_field(size >= 8, "file size", size, ">= 8 bytes (the 8-byte header length comes first)")
      (header_len,) = struct.unpack("<Q", f.read(8))
      check_field(header_len <= min(size - 8, MAX_JSON_BYTES), "header length", header_len,
                  f"at most {min(size - 8, MAX_JSON_BYTES)} (the bytes after it)")
      header = parse_json(f.read(header_len), "header")
      header.pop("__metadata__", None)
      _check_header(header, size - 8 - header_len)
    self.header = header
    self.data_start = 8 + header_len
    self._mmap = None

  def tensor(self, name: str) -> np.ndarray:
    info = self.header[name]
    if self._mmap is None:
      with open_regular(self.path) as f:
        self._mmap = np.memmap(f, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    raw = self._mmap[self.data_start + start:self.data_start + end]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def inside(root: pathlib.Path, name: str, source: pathlib.Path) -> pathlib.Path:
  """root/name, refused unless it resolves (symlinks followed) inside root; in an HF hub cache snapshot
  (`models--*/snapshots/<rev>/`, whose files link to `../../blobs/`) inside the cached repository."""
  allowed = root.resolve()
  if allowed.parent.name == "snapshots" and allowed.parent.parent.name.startswith("models--"):
    allowed = allowed.parent.parent
  target = (root / name).resolve()
  if target == allowed or not target.is_relative_to(allowed):
    raise CheckpointError(f"{source}: file {name!r} resolves to {target}, outside the checkpoint {allowed}; "
                          "allowed: files inside it.")
  return root / name


class SafetensorsDir:
  """A checkpoint directory: one `model.safetensors`, or shards listed by `model.safetensors.index.json`."""

  def __init__(self, path: str | pathlib.Path):
    path = pathlib.Path(path)
    self.path = path
    index = path / INDEX_FILE
    self._where = {}
    if index.exists():
      weight_map = read_json(inside(path, INDEX_FILE, path)).get("weight_map")
      if not (isinstance(weight_map, dict) and all(isinstance(name, str) for name in weight_map.values())):
        raise CheckpointError(f"{index}: weight_map={weight_map!r:.100} is invalid; allowed: an object of file "
                              "names.")
      files = {name: SafetensorsFile(inside(path, name, index)) for name in sorted(set(weight_map.values()))}
      for key, name in weight_map.items():
        if key not in files[name].header:
          raise CheckpointError(f"{index}: tensor {key!r} is listed in {name}, whose header has no such tensor.")
        self._where[key] = files[name]
    else:
      shards = sorted(path.glob("*.safetensors"))
      if not shards:
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no *.safetensors files.")
      for shard in shards:
        file = SafetensorsFile(inside(path, shard.name, path))
        for key in file.header:
          if key in self._where:
            raise CheckpointError(f"{path}: tensor {key!r} is in both {self._where[key].path} and {file.path}; "
                                  "allowed: each tensor in one file.")
          self._where[key] = file

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key].header[key]["shape"])

  def dtype(self, key: str) -> str:
    """The safetensors dtype name ("F32", "F8_E4M3", ...)."""
    return self._where[key].header[key]["dtype"]

  def file(self, key: str) -> pathlib.Path:
    return self._where[key].path

  def read(self, key: str, axes: list[np.ndarray] | None = None) -> np.ndarray:
    """A copy of tensor `key`, or of its elements at the outer product of `axes` (one ascending index array per
    dim). The loader takes bytes from the memory map only through here, and only those it asks for."""
    tensor = self._where[key].tensor(key)
    if axes is None:
      return np.array(tensor)
    box = tuple(slice(a[0], a[-1] + 1) if a.size else slice(0, 0) for a in axes)
    if all(a.size == s.stop - s.start for a, s in zip(axes, box)):
      return np.array(tensor[box])
    return np.asarray(tensor[box][np.ix_(*(a - s.start for a, s in zip(axes, box)))])


def write_file(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """Writes one .safetensors file (tensors in key order, 8-byte aligned header)."""
  header, offset = {}, 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
