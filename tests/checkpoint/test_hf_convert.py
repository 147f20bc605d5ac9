"""HF checkpoint import/export: round trips, FP8 dequantisation, sharded directories, clear key errors."""

import collections
import json
import math
import shutil
import time

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dsa_jax
from dsa_jax.checkpoint import CheckpointError, hf_config, hf_convert, safetensors_io
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
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
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


SPLITS = {  # per leaf rank, over a (2, 4) mesh; "inner" splits dims that HF stores interleaved (N x H rows)
    "outer": {1: P(("a", "b")), 2: P("a", "b"), 3: P("a", "b", None)},
    "inner": {1: P(("b", "a")), 2: P("b", "a"), 3: P(None, "a", "b")},
}


@pytest.mark.parametrize("split", SPLITS)
def test_each_device_reads_only_its_slice(monkeypatch, split):
  """8 devices, FP8 weights: every read of a weight tensor is exactly one shard's elements (and the loaded values
  equal the single-device load), for copies, linears (one and two input dims) and stacked experts."""
  path = TINY / "fp8"
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  cfg = hf_config.read_config(path, "float32")
  ckpt = safetensors_io.SafetensorsDir(path)
  expected = collections.defaultdict(list)

  def shardings(leaf_path, leaf):
    sharding = NamedSharding(mesh, SPLITS[split][leaf.ndim])
    shard = sharding.shard_shape(leaf.shape)
    m = hf_convert.mapping(cfg, leaf_path)
    for key in m.hf_keys():
      itemsize = safetensors_io.DTYPES[ckpt.dtype(key)](0).itemsize
      if m.kind == "experts":  # each device reads its experts' slices
        devices = len(jax.devices()) * shard[0] // leaf.shape[0]
        expected[key] += [math.prod(shard[1:]) * itemsize] * devices
      else:
        expected[key] += [math.prod(shard) * itemsize] * len(jax.devices())
    return sharding

  reads = collections.defaultdict(list)
  read = safetensors_io.SafetensorsDir.read

  def counting_read(self, key, axes=None):
    value = read(self, key, axes)
    reads[key].append(value.nbytes)
    return value

  monkeypatch.setattr(safetensors_io.SafetensorsDir, "read", counting_read)
  _, state = dsa_jax.load_hf(path, shardings=shardings)
  weights = {key: sorted(reads[key]) for key in expected}
  assert weights == {key: sorted(sizes) for key, sizes in expected.items()}
  assert all(n < math.prod(ckpt.shape(k)) for k, sizes in weights.items() for n in sizes)  # every tensor is split
  monkeypatch.undo()
  _, whole = dsa_jax.load_hf(path)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, whole))


def rewrite(path, change):
  """Rewrites path/model.safetensors after `change(tensors)` edits its dict of numpy arrays."""
  f = safetensors_io.SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.tensor(k)) for k in f.header}
  change(tensors)
  safetensors_io.write_file(path / "model.safetensors", tensors)
  return path


def load_error(path, **kwargs) -> str:
  with pytest.raises(CheckpointError) as error:
    dsa_jax.load_hf(path, **kwargs)
  assert "\n" not in str(error.value)
  return str(error.value)


def test_integer_bytes_are_not_loaded_as_weights(tmp_path):
  path = rewrite(copy_fixture(tmp_path), lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  assert "wrong dtype: model.norm.weight is I32 in model.safetensors; allowed: " in load_error(path)


def test_fp8_weight_without_its_scale_is_refused(tmp_path):
  key = "model.layers.1.self_attn.q_b_proj.weight"
  path = rewrite(copy_fixture(tmp_path, TINY / "fp8"), lambda t: t.pop(key + "_scale_inv"))
  assert f"no scale: {key} is F8_E4M3 but {key}_scale_inv is missing" in load_error(path)


@pytest.mark.parametrize("block, tiles", [([32, 32], [3, 1]), ([2**40, 2**40], [1, 1])])
def test_fp8_block_size_must_tile_as_the_scales_say(tmp_path, block, tiles):
  path = copy_fixture(tmp_path, TINY / "fp8")
  hf = json.loads((path / "config.json").read_text())
  hf["quantization_config"]["weight_block_size"] = block
  (path / "config.json").write_text(json.dumps(hf))
  key = "model.layers.0.self_attn.q_b_proj.weight"
  assert (f"wrong scale shape: {key}_scale_inv is [6, 2], expected {tiles} (weight [96, 32] in tiles of "
          f"quantization_config.weight_block_size {block})") in load_error(path)


def test_non_finite_weights_are_reported_unless_allowed(tmp_path):
  def poison(tensors):
    tensors["lm_head.weight"][3, 5] = np.nan
    tensors["lm_head.weight"][0, 0] = -np.inf

  path = rewrite(copy_fixture(tmp_path), poison)
  assert load_error(path) == (f"{path / 'model.safetensors'}: tensor 'lm_head.weight' has 2 non-finite values "
                              "(NaN or Inf) of 32768; pass allow_non_finite=True to load it as it is.")
  rows = NamedSharding(jax.make_mesh((8,), ("a",)), P(None, "a"))  # lm_head [D, V]: HF rows split 8 ways
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  assert load_error(path, shardings=lambda p, _: rows if p == ("lm_head",) else one).endswith(
      "has 2 non-finite values (NaN or Inf) of 4096 in one device's slice; pass allow_non_finite=True to load it "
      "as it is.")
  _, state = dsa_jax.load_hf(path, allow_non_finite=True)
  assert np.isnan(state["lm_head"].get_value()[5, 3]) and np.isinf(state["lm_head"].get_value()[0, 0])


def edit_config(path, **changes):
  hf = json.loads((path / "config.json").read_text())
  hf.update(changes)
  (path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
  return path


def test_problem_listing_is_capped(tmp_path):
  path = edit_config(copy_fixture(tmp_path), n_routed_experts=4, n_group=2, topk_group=1)
  message = load_error(path)  # 2 MoE layers x (4 surplus experts x 3 unknown + router and bias misshaped)
  assert "(28 problems): wrong shape: model.layers.1.mlp.gate" in message and message.endswith("; ... 18 more")


@pytest.mark.parametrize("changes, missing", [
    ({"n_routed_experts": 64}, "model.layers.2.mlp.experts.63.down_proj.weight"),
    ({"num_hidden_layers": 1000, "mlp_layer_types": None}, "model.layers.999.input_layernorm.weight"),
])
def test_config_larger_than_the_checkpoint_fails_at_once(tmp_path, changes, missing):
  path = edit_config(copy_fixture(tmp_path), **changes)
  start = time.perf_counter()
  assert f"but the checkpoint has no {missing}; allowed: a config.json of these weights." in load_error(path)
  assert time.perf_counter() - start < 5


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
