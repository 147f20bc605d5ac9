"""config.json as untrusted input: every field we read is checked for type and range before any work, and the
error names the file, the field, the value and what is allowed."""

import json
import time

import pytest

from dsa_jax.checkpoint import CheckpointError, hf_config
from tests.conftest import FIXTURES

TINY_CONFIG = json.loads((FIXTURES / "hf_deepseek_v32_tiny" / "config.json").read_text())
YARN = TINY_CONFIG["rope_parameters"]

BAD_FIELDS = [  # (changes to the tiny config, expected message after "config.json: ")
    ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps='1e-6' is invalid; allowed: a finite number in \(0, 1\]"),
    ({"rms_norm_eps": float("nan")}, r"rms_norm_eps=nan is invalid"),
    ({"rms_norm_eps": -1.0}, r"rms_norm_eps=-1.0 is invalid"),
    ({"hidden_size": 64.0}, r"hidden_size=64.0 is invalid; allowed: an integer in \[1, 65536\]"),
    ({"vocab_size": True}, r"vocab_size=True is invalid; allowed: an integer"),
    ({"n_routed_experts": 1e6}, r"n_routed_experts=1000000.0 is invalid; allowed: an integer in \[1, 4096\]"),
    ({"n_routed_experts": 10**6}, r"n_routed_experts=1000000 is invalid; allowed: an integer in \[1, 4096\]"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers=0 is invalid; allowed: an integer in \[1, 1024\]"),
    ({"n_shared_experts": -1}, r"n_shared_experts=-1 is invalid; allowed: an integer in \[0, 64\]"),
    ({"norm_topk_prob": "yes"}, r"norm_topk_prob='yes' is invalid; allowed: true or false"),
    ({"routed_scaling_factor": float("inf")}, r"routed_scaling_factor=inf is invalid"),
    ({"num_nextn_predict_layers": 2}, r"num_nextn_predict_layers=2 is invalid; allowed: an integer in \[0, 1\]"),
    ({"vocab_size": None}, r"vocab_size is missing or null"),
    ({"model_type": 3}, r"HF config model_type=3 is not supported"),
    ({"mlp_layer_types": ["dense", "sparse"]}, r"mlp_layer_types=\['dense', 'sparse'\] is invalid; allowed: a list "
                                                r"of 3 \(num_hidden_layers\)"),
    ({"mlp_layer_types": "dense"}, r"mlp_layer_types='dense' is invalid"),
    ({"rope_parameters": [1]}, r"rope_parameters=\[1\] is invalid; allowed: an object"),
    ({"rope_parameters": {**YARN, "factor": "4"}}, r"rope_parameters.factor='4' is invalid; allowed: a finite number"),
    ({"rope_parameters": {**YARN, "rope_theta": -1}}, r"rope_parameters.rope_theta=-1 is invalid"),
    ({"rope_parameters": {k: v for k, v in YARN.items() if k != "factor"}}, r"rope_parameters.factor is missing"),
    ({"n_group": 3}, r"MoEConfig.num_groups=3 is invalid; allowed: a divisor of num_experts=8"),
]


def write_config(tmp_path, hf):
  (tmp_path / "config.json").write_text(json.dumps(hf))
  return tmp_path


@pytest.mark.parametrize("changes, message", BAD_FIELDS, ids=[str(c) for c, _ in BAD_FIELDS])
def test_bad_fields_fail_at_once_naming_file_field_and_allowed(tmp_path, changes, message):
  path = write_config(tmp_path, {**TINY_CONFIG, **changes})
  start = time.perf_counter()
  with pytest.raises(CheckpointError, match=r"config\.json: " + message) as error:
    hf_config.read_config(path)
  assert time.perf_counter() - start < 1.0
  assert "\n" not in str(error.value)


def test_official_integer_floats_are_accepted(tmp_path):
  """The official config writes rope_theta, factor and beta_fast as JSON integers."""
  rope = {**YARN, "rope_theta": 10000, "factor": 4, "beta_fast": 32, "beta_slow": 1}
  cfg = hf_config.read_config(write_config(tmp_path, {**TINY_CONFIG, "rope_parameters": rope}))
  assert cfg == hf_config.read_config(FIXTURES / "hf_deepseek_v32_tiny")


@pytest.mark.parametrize("text, message", [
    ('{"vocab_size": 1, "vocab_size": 2}', r"duplicate key 'vocab_size'"),
    ("[1]", r"a list; allowed: a JSON object"),
    ("{", r"not JSON"),
])
def test_malformed_config_json(tmp_path, text, message):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(CheckpointError, match=r"config\.json: .*" + message):
    hf_config.read_config(tmp_path)


@pytest.mark.parametrize("block, message", [
    ([0, 16], r"\[0, 16\] is invalid; allowed: two positive integers"),
    ([16], r"\[16\] is invalid"),
    (["16", 16], r"\['16', 16\] is invalid"),
    ([16.0, 16], r"\[16.0, 16\] is invalid"),
])
def test_bad_fp8_block_size(tmp_path, block, message):
  hf = {**TINY_CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
  with pytest.raises(CheckpointError, match=r"config\.json: quantization_config.weight_block_size=" + message):
    hf_config.read_block_size(write_config(tmp_path, hf))
