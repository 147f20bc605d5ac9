"""Configs: validation messages, presets, HF config reading, the 671B parameter count (no allocation)."""

import json

import jax
from absl.testing import parameterized

import dsa_jax
from dsa_jax.checkpoint import hf_config
from dsa_jax.model import config, functional
from tests.conftest import FIXTURES


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      (lambda: config.MoEConfig(num_experts=10, num_groups=4), r"MoEConfig.num_groups=4 is invalid; allowed: a divisor"),
      (lambda: config.MLAConfig(qk_rope_head_dim=7), r"MLAConfig.qk_rope_head_dim=7 is invalid; allowed: an even"),
      (lambda: config.ModelConfig(dtype="float16"), r"ModelConfig.dtype='float16' is invalid; allowed:"),
      (lambda: config.IndexerConfig(topk=0), r"IndexerConfig.topk=0 is invalid; allowed: a positive integer"),
      (lambda: config.preset("huge"), r"preset='huge' is unknown; allowed: \['small', 'tiny', 'v3_2_671b', 'v3_2_layers'\]"),
  )
  def test_errors_name_field_value_and_allowed(self, make, message):
    with self.assertRaisesRegex(ValueError, message):
      make()

  def test_671b_parameter_count_without_allocating(self):
    cfg = config.v3_2_671b()
    self.assertAlmostEqual(cfg.softmax_scale, 0.1352338, places=6)
    state = functional.abstract_state(cfg.replace(num_mtp_layers=0))
    self.assertTrue(all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)))
    self.assertEqual(functional.count_params(state), 671_877_929_216)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    indexer = sum(x.size for p, x in leaves if "indexer" in jax.tree_util.keystr(p))
    experts = sum(x.size for p, x in leaves if any(f"'{w}'" in jax.tree_util.keystr(p) for w in ("w_gate", "w_up", "w_down")))
    self.assertEqual(indexer, 851_524_864)
    self.assertEqual(experts, 653_908_770_816)
    with_mtp = functional.count_params(functional.abstract_state(cfg))
    self.assertEqual(with_mtp, 683_501_956_608)  # + 11,624,027,392 in the MTP layer

  def test_presets(self):
    for name in config.PRESETS:
      cfg = config.preset(name)
      self.assertIsNotNone(cfg.indexer)
    small = functional.count_params(functional.abstract_state(config.small()))
    self.assertTrue(2e8 < small < 1e9, small)

  def test_reads_fixture_config(self):
    cfg = hf_config.read_config(FIXTURES / "hf_deepseek_v32_tiny")
    self.assertEqual((cfg.num_layers, cfg.first_k_dense, cfg.indexer.topk, cfg.moe.num_groups), (3, 1, 8, 4))
    self.assertEqual(cfg.num_mtp_layers, 0)

  def test_deepseek_v3_config_is_dense(self):
    hf = json.loads((FIXTURES / "hf_deepseek_v32_tiny" / "config.json").read_text())
    for key in ("index_topk", "index_n_heads", "index_head_dim"):
      hf.pop(key)
    hf["model_type"] = "deepseek_v3"
    cfg = hf_config.config_from_hf(hf)
    self.assertIsNone(cfg.indexer)
    self.assertEqual(hf_config.config_to_hf(cfg)["model_type"], "deepseek_v3")

  def test_official_rope_scaling_fields(self):
    hf = hf_config.config_to_hf(config.v3_2_671b())
    hf["rope_scaling"] = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    hf["rope_theta"] = 10000
    del hf["rope_parameters"]
    self.assertEqual(hf_config.config_from_hf(hf, "bfloat16"), config.v3_2_671b().replace(param_dtype="bfloat16"))

  def test_unsupported_hf_fields(self):
    hf = hf_config.config_to_hf(config.tiny())
    with self.assertRaisesRegex(ValueError, r"HF config model_type='llama' is not supported"):
      hf_config.config_from_hf({**hf, "model_type": "llama"})
    with self.assertRaisesRegex(ValueError, r"num_key_value_heads=1 is not supported"):
      hf_config.config_from_hf({**hf, "num_key_value_heads": 1})

  def test_public_api(self):
    for name in ("load_hf", "forward", "save_hf", "init", "apply", "preset"):
      self.assertTrue(callable(getattr(dsa_jax, name)))
