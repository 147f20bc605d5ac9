"""HF checkpoint import/export: round trips, FP8 dequantisation, sharded directories, clear key errors."""

import json
import shutil

import chex
import jax
import ml_dtypes
import numpy as np

import dsa_jax
from dsa_jax.checkpoint import hf_convert, safetensors_io
from dsa_jax.model import config, functional
from tests.conftest import FIXTURES

TINY = FIXTURES / "hf_deepseek_v32_tiny"


def copy_fixture(tmp_path, source=TINY):
  target = tmp_path / "ckpt"
  shutil.copytree(source, target)
  for f in target.iterdir():
    f.chmod(0o644)
  return target



def test_export_then_import_round_trip(tmp_path):
  cfg = config.tiny().replace(num_mtp_layers=1)
  state = functional.init(cfg, seed=3)
  dsa_jax.save_hf(tmp_path, cfg, state, max_shard_bytes=200_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1  # really sharded
  cfg2, state2 = dsa_jax.load_hf(tmp_path)
  assert cfg2.num_mtp_layers == 1 and cfg2.indexer == cfg.indexer and cfg2.moe == cfg.moe
  chex.assert_trees_all_close(jax.tree.leaves(state2), jax.tree.leaves(state), atol=0, rtol=0)
  ids = np.random.randint(0, cfg.vocab_size, (1, 12))
  chex.assert_trees_all_close(dsa_jax.forward(cfg2, state2, ids), dsa_jax.forward(cfg, state, ids), atol=1e-6)


def test_fixture_export_reproduces_hf_tensors(tmp_path):
  cfg, state = dsa_jax.load_hf(TINY)
  exported = hf_convert.hf_tensors(cfg, state)
  original = safetensors_io.SafetensorsDir(TINY)
  assert sorted(exported) == original.keys()
  for key in original.keys():
    np.testing.assert_array_equal(exported[key], original.read(key), err_msg=key)


def test_fp8_weights_are_dequantised_by_tile(tmp_path):
  fp8_dir = TINY / "fp8"
  ckpt = safetensors_io.SafetensorsDir(fp8_dir)
  key = "model.layers.1.self_attn.q_b_proj.weight"
  assert ckpt.read(key).dtype == ml_dtypes.float8_e4m3fn
  weight = np.asarray(ckpt.read(key), np.float32)
  scale = np.asarray(ckpt.read(key + "_scale_inv"))
  expected = weight * np.kron(scale, np.ones((16, 16), np.float32))[:weight.shape[0], :weight.shape[1]]
  cfg, state = dsa_jax.load_hf(fp8_dir)
  ours = np.asarray(state["layers"][1]["attn"]["wq_b"].get_value())
  np.testing.assert_array_equal(ours.reshape(ours.shape[0], -1).T, expected)


def test_unknown_missing_and_misshaped_keys_are_listed(tmp_path):
  path = copy_fixture(tmp_path)
  f = safetensors_io.SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.tensor(k)) for k in f.header}
  tensors["model.layers.0.self_attn.surprise.weight"] = np.zeros((2, 2), np.float32)
  del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
  tensors["model.norm.weight"] = np.zeros((65,), np.float32)
  safetensors_io.write_file(path / "model.safetensors", tensors)
  try:
    dsa_jax.load_hf(path)
    raise AssertionError("load_hf accepted a bad checkpoint")
  except ValueError as e:
    message = str(e)
  assert "3 problems" in message
  assert "unknown: model.layers.0.self_attn.surprise.weight" in message
  assert "missing: model.layers.2.mlp.experts.5.up_proj.weight" in message
  assert "wrong shape: model.norm.weight is [65], expected [64]" in message


def test_streaming_respects_target_sharding():
  devices = jax.devices()
  sharding = jax.sharding.SingleDeviceSharding(devices[-1])
  seen = []

  def shardings(path, leaf):
    seen.append(path)
    return sharding

  _, state = dsa_jax.load_hf(TINY, shardings=shardings)
  assert len(seen) == len(jax.tree.leaves(state))
  assert all(x.sharding == sharding for x in jax.tree.leaves(state))


def test_export_with_the_tokenizer(tmp_path):
  """save_hf(..., tokenizer=) writes tokenizer.json and tokenizer_config.json; the checkpoint's tokenizer
  reads back as the same tokenizer (the byte tokenizer of our runs here)."""
  from dsa_jax.data.tokenizer import ByteTokenizer, from_checkpoint

  byte = ByteTokenizer()
  cfg = config.tiny().replace(vocab_size=byte.vocab_size, num_mtp_layers=0)
  dsa_jax.save_hf(tmp_path, cfg, functional.init(cfg, seed=0), tokenizer=byte)
  tok = from_checkpoint(tmp_path)
  text = "sort:4132=<｜end▁of▁sentence｜>é"
  assert tok.encode(text) == byte.encode(text) and tok.decode(byte.encode(text)) == text
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
  assert dsa_jax.load_hf(tmp_path)[0] == cfg
  assert from_checkpoint(TINY) is None  # the fixture ships no tokenizer
