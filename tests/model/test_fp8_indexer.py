"""The optional FP8 indexer numerics (Hadamard rotation, e4m3 with ue8m0 block scales)."""

import chex
import jax.numpy as jnp
import numpy as np

import dsa_jax
from dsa_jax.model import fp8, functional
from tests.conftest import FIXTURES


class FP8Test(chex.TestCase):

  def test_hadamard_is_orthonormal(self):
    h = fp8.hadamard_matrix(128)
    chex.assert_trees_all_close(h @ h.T, np.eye(128, dtype=np.float32), atol=1e-5)
    with self.assertRaisesRegex(ValueError, "n=12 is invalid; allowed: a power of two"):
      fp8.hadamard_matrix(12)

  def test_rotation_preserves_dot_products(self):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal((7, 64)).astype(np.float32)
    chex.assert_trees_all_close(fp8.rotate(jnp.asarray(q)) @ fp8.rotate(jnp.asarray(k)).T, q @ k.T, atol=1e-4)

  def test_ue8m0_scales_and_e4m3_range(self):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((9, 256)).astype(np.float32) * np.exp(rng.standard_normal((9, 1)) * 3))
    values, scale = fp8.quantize_e4m3(x, 128)
    chex.assert_shape(scale, (9, 2))
    np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))  # powers of two
    self.assertEqual(values.dtype, jnp.float8_e4m3fn)
    self.assertLessEqual(float(jnp.abs(values.astype(jnp.float32)).max()), 448.0)
    deq = (values.astype(jnp.float32).reshape(9, 2, 128) * scale[..., None]).reshape(9, 256)
    blockmax = jnp.repeat(jnp.abs(x).reshape(9, 2, 128).max(-1), 128, axis=-1)
    self.assertLess(float((jnp.abs(deq - x) / blockmax).max()), 2.0 ** -4)

  def test_fp8_selection_close_to_exact(self):
    cfg, params = dsa_jax.load_hf(FIXTURES / "hf_deepseek_v32_tiny")
    ids = np.load(FIXTURES / "hf_deepseek_v32_tiny" / "golden.npz")["input_ids"]
    exact = functional.apply(cfg, params, ids)
    quant = functional.apply(cfg, params, ids, indexer_fp8=True)
    for a, b in zip(exact.layer_aux, quant.layer_aux):
      ia, ib = np.asarray(a.attention.topk_indices), np.asarray(b.attention.topk_indices)
      overlap = np.mean([len(set(x) & set(y)) / len(set(x)) for x, y in zip(ia.reshape(-1, 8), ib.reshape(-1, 8))])
      # Tiny index heads (16 dims) make e4m3 rounding visible; most of each selected set survives it.
      self.assertGreater(overlap, 0.85)
