"""Our model against golden outputs of HuggingFace's DeepseekV32ForCausalLM (an implementation we did not write).

Logits and every layer's hidden state (where the fixture holds them: not the FP8 one, a skipped test says so)
within 1e-4 of the golden values relative to their max magnitude;
every layer's top-k selection identical.
"""

import chex
import jax
import numpy as np
from absl.testing import parameterized

import dsa_jax
from dsa_jax.model import functional
from tests.conftest import FIXTURES

FIXTURE_DIRS = {
    "tiny": FIXTURES / "hf_deepseek_v32_tiny",
    "tiny_fp8": FIXTURES / "hf_deepseek_v32_tiny" / "fp8",
    "alt": FIXTURES / "hf_deepseek_v32_alt",
}


WITH_HIDDEN_STATES = ("tiny", "alt")  # golden.npz files holding every layer's hidden state (fixtures/README.md)


def relative_error(ours, golden) -> float:
  return float(np.abs(np.asarray(ours) - golden).max() / np.abs(golden).max())


class HFParityTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, name) for name in FIXTURE_DIRS])
  def test_matches_hf(self, name):
    path = FIXTURE_DIRS[name]
    cfg, params = dsa_jax.load_hf(path)
    golden = np.load(path / "golden.npz")
    run = self.variant(lambda p, ids: functional.apply(cfg, p, ids, attention="sparse"))
    out = run(params, golden["input_ids"])
    chex.assert_shape(out.logits, golden["logits"].shape)
    self.assertLess(relative_error(out.logits, golden["logits"]), 1e-4)
    hidden = [f"hidden_layer{i}" for i in range(cfg.num_layers)] if name in WITH_HIDDEN_STATES else []
    self.assertEqual(sorted(k for k in golden if k.startswith("hidden_layer")), hidden)
    for i, key in enumerate(hidden):
      self.assertLess(relative_error(out.hidden_states[i], golden[key]), 1e-4, f"layer {i}")
    for i in range(cfg.num_layers):
      np.testing.assert_array_equal(out.layer_aux[i].attention.topk_indices, golden[f"topk_indices_layer{i}"],
                                    err_msg=f"top-k of layer {i}")

  def test_fp8_hidden_states(self):
    self.skipTest("not checked: tests/fixtures/hf_deepseek_v32_tiny/fp8/golden.npz holds HF's logits and top-k "
                  "only (no hidden states), and regenerating it needs torch; the FP8 logits and every layer's top-k "
                  "are checked in test_matches_hf")

  def test_public_forward(self):
    cfg, params = dsa_jax.load_hf(FIXTURE_DIRS["tiny"])
    golden = np.load(FIXTURE_DIRS["tiny"] / "golden.npz")
    logits = dsa_jax.forward(cfg, params, golden["input_ids"], attention="sparse")
    self.assertLess(relative_error(logits, golden["logits"]), 1e-4)
    self.assertEqual(logits.dtype, jax.numpy.float32)
