"""Safetensors files and directories as untrusted input: paths that stay inside the checkpoint, regular files only,
and headers checked against the file before any tensor is read."""

import json
import os
import signal
import struct

import numpy as np
import pytest

import dsa_jax
from dsa_jax.checkpoint import CheckpointError, safetensors_io
from tests.checkpoint.test_hf_convert import TINY, copy_fixture

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def raw(header, data=b"", length=None) -> bytes:
  """The bytes of a .safetensors file with any header (a dict, or raw bytes) and any declared header length."""
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def move_weights_out(path, index_entry):
  """Moves the fixture's weights out of the checkpoint and points the index at them with `index_entry`."""
  outside = path.parent / "outside.safetensors"
  (path / "model.safetensors").rename(outside)
  keys = safetensors_io.SafetensorsFile(outside).header
  (path / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": {k: index_entry(outside) for k in keys}}))


@pytest.mark.parametrize("index_entry", [lambda outside: "../outside.safetensors", lambda outside: str(outside)],
                         ids=["dotdot", "absolute"])
def test_index_entries_outside_the_checkpoint_are_refused(tmp_path, index_entry):
  path = copy_fixture(tmp_path)
  move_weights_out(path, index_entry)
  with pytest.raises(CheckpointError, match=r"index\.json.*outside\.safetensors.*outside the checkpoint"):
    safetensors_io.SafetensorsDir(path)


@pytest.mark.parametrize("with_index", [True, False])
def test_symlinks_leaving_the_checkpoint_are_refused(tmp_path, with_index):
  path = copy_fixture(tmp_path)
  move_weights_out(path, lambda outside: "model.safetensors")
  if not with_index:
    (path / safetensors_io.INDEX_FILE).unlink()
  (path / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
  with pytest.raises(CheckpointError, match="model.safetensors.*outside the checkpoint"):
    safetensors_io.SafetensorsDir(path)


def test_config_json_leaving_the_checkpoint_is_refused(tmp_path):
  path = copy_fixture(tmp_path)
  (path / "config.json").rename(tmp_path / "config.json")
  (path / "config.json").symlink_to(tmp_path / "config.json")
  with pytest.raises(CheckpointError, match="'config.json' resolves to .* outside the checkpoint"):
    dsa_jax.load_hf(path)


def test_hf_hub_cache_symlinks_into_blobs_load(tmp_path):
  """`huggingface_hub` snapshots hold symlinks to ../../blobs/<hash>: inside the cached repository, so allowed."""
  repo = tmp_path / "models--deepseek-ai--tiny"
  snapshot = copy_fixture(repo / "snapshots").rename(repo / "snapshots" / "abc123")
  (repo / "blobs").mkdir()
  (snapshot / "model.safetensors").rename(repo / "blobs" / "f00d")
  (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
  assert safetensors_io.SafetensorsDir(snapshot).keys() == safetensors_io.SafetensorsDir(TINY).keys()


def test_fifo_is_refused_without_blocking(tmp_path):
  path = copy_fixture(tmp_path)
  (path / "model.safetensors").unlink()
  os.mkfifo(path / "model.safetensors")

  def hung(signum, frame):
    raise TimeoutError("opening the FIFO blocked")

  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(10)  # without the check, open() waits for a writer forever
  try:
    with pytest.raises(CheckpointError, match=r"model\.safetensors.* not a regular file"):
      safetensors_io.SafetensorsDir(path)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_index_naming_a_tensor_its_file_lacks_is_refused(tmp_path):
  path = copy_fixture(tmp_path)
  keys = list(safetensors_io.SafetensorsFile(path / "model.safetensors").header) + ["model.extra.weight"]
  (path / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keys}}))
  with pytest.raises(CheckpointError, match="model.extra.weight.*model.safetensors"):
    safetensors_io.SafetensorsDir(path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
  (tmp_path / "a.safetensors").write_bytes(raw({"x": F32}, bytes(8)))
  (tmp_path / "b.safetensors").write_bytes(raw({"x": F32}, bytes(8)))
  with pytest.raises(CheckpointError, match=r"'x' is in both .*a\.safetensors and .*b\.safetensors"):
    safetensors_io.SafetensorsDir(tmp_path)


BAD_FILES = {  # name -> (file bytes, expected message after the file name)
    "short file": (b"abc", r"file size=3 is invalid; allowed: >= 8 bytes"),
    "length beyond file": (raw({"x": F32}, bytes(8), length=1000),
                           r"header length=1000 is invalid; allowed: at most \d+ \(the bytes after it\)"),
    "not json": (raw(b"{not json"), r"header is not JSON \(Expecting"),
    "not utf-8": (raw(b'{"\xff": 1}'), r"header is not JSON \('utf-8' codec"),
    "not an object": (raw(b"[1, 2]"), r"header is a list; allowed: a JSON object"),
    "duplicate key": (raw(b'{"x": {}, "x": {}}'), r"header has duplicate key 'x'; allowed: unique keys"),
    "entry not an object": (raw({"x": 3}), r"tensor 'x'=3 is invalid; allowed: an object with dtype, shape, "
                                           r"data_offsets"),
    "unknown dtype": (raw({"x": {**F32, "dtype": "Q4"}}, bytes(8)), r"tensor 'x' dtype='Q4' is invalid; allowed: \["),
    "float shape": (raw({"x": {**F32, "shape": [2.0]}}, bytes(8)), r"tensor 'x' shape=\[2.0\] is invalid; allowed: "
                                                                   r"a list of non-negative ints"),
    "negative offset": (raw({"x": {**F32, "data_offsets": [-8, 0]}}, bytes(8)),
                        r"tensor 'x' data_offsets=\[-8, 0\] is invalid; allowed: \[begin, end\]"),
    "wrong length": (raw({"x": {**F32, "shape": [3]}}, bytes(12)),
                     r"tensor 'x' data_offsets=\[0, 8\] is invalid; allowed: a span of 12 bytes \(shape \[3\] x 4\)"),
    "truncated": (raw({"x": F32}, bytes(5)), r"tensor 'x' data_offsets=\[0, 8\] reach past the end of the data "
                                             r"section \(5 bytes\): the file is truncated"),
    "overlap": (raw({"x": F32, "y": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
                r"tensors 'x' and 'y' overlap \(data_offsets \[0, 8\] and \[4, 12\]\); allowed: disjoint spans"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_headers_are_refused_naming_file_and_tensor(tmp_path, case):
  content, message = BAD_FILES[case]
  (tmp_path / "w.safetensors").write_bytes(content)
  with pytest.raises(CheckpointError, match=r"w\.safetensors: " + message) as error:
    safetensors_io.SafetensorsFile(tmp_path / "w.safetensors")
  assert "\n" not in str(error.value)


def test_truncated_checkpoint_names_file_and_tensor(tmp_path):
  path = copy_fixture(tmp_path)
  weights = path / "model.safetensors"
  last = max(safetensors_io.SafetensorsFile(weights).header.items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
  os.truncate(weights, weights.stat().st_size - 100)
  with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{last}' .* truncated"):
    dsa_jax.load_hf(path)


def test_valid_file_round_trips(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0,), np.int8)}
  safetensors_io.write_file(tmp_path / "t.safetensors", tensors)
  f = safetensors_io.SafetensorsFile(tmp_path / "t.safetensors")
  np.testing.assert_array_equal(f.tensor("a"), tensors["a"])
  assert f.tensor("b").shape == (0,)
