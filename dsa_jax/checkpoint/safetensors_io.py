"""Minimal safetensors reader/writer on numpy memory maps.

Why not `safetensors.numpy`: numpy has no float8/bfloat16, so it cannot open DeepSeek's FP8 checkpoints.
This reader maps the file and views each tensor with its `ml_dtypes` type, so a tensor is read from disk
only when (and as far as) it is sliced — the 671B checkpoint never has to sit in host memory.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw data.
"""

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
  """One .safetensors file: header parsed eagerly, data memory-mapped lazily."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    self.header = header
    self.data_start = 8 + header_len
    self._mmap = None

  def tensor(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has dtype={info['dtype']!r}; allowed: {sorted(DTYPES)}.")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    raw = self._mmap[self.data_start + start:self.data_start + end]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsDir:
  """A checkpoint directory: one `model.safetensors`, or shards listed by `model.safetensors.index.json`."""

  def __init__(self, path: str | pathlib.Path):
    path = pathlib.Path(path)
    self.path = path
    index = path / INDEX_FILE
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = {name: SafetensorsFile(path / name) for name in sorted(set(weight_map.values()))}
      self._where = {key: files[name] for key, name in weight_map.items()}
    else:
      shards = sorted(path.glob("*.safetensors"))
      if not shards:
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no *.safetensors files.")
      self._where = {}
      for shard in shards:
        file = SafetensorsFile(shard)
        self._where.update({key: file for key in file.header})

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key].header[key]["shape"])

  def read(self, key: str) -> np.ndarray:
    return self._where[key].tensor(key)


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
