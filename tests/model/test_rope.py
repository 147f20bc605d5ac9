"""RoPE layouts (the spec's "RoPE trap") and YaRN frequencies, against independent formulas."""

import math

import chex
import jax.numpy as jnp
import numpy as np

from dsa_jax.model import rope
from dsa_jax.model.config import RopeConfig


def complex_rotate(pairs_real, pairs_imag, angle):
  z = (pairs_real + 1j * pairs_imag) * np.exp(1j * angle)
  return z.real, z.imag


class RopeTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    self.angles = rng.random((1, 3, 4)).astype(np.float32) * 5
    self.cos, self.sin = jnp.cos(self.angles), jnp.sin(self.angles)

  def test_interleaved_rotates_adjacent_pairs(self):
    out = np.asarray(rope.apply_interleaved(jnp.asarray(self.x), self.cos, self.sin))
    re, im = complex_rotate(self.x[..., 0::2], self.x[..., 1::2], self.angles)
    chex.assert_trees_all_close(out[..., 0::2], re, atol=1e-5)
    chex.assert_trees_all_close(out[..., 1::2], im, atol=1e-5)

  def test_half_split_rotates_i_with_i_plus_half(self):
    out = np.asarray(rope.apply_half_split(jnp.asarray(self.x), self.cos, self.sin))
    re, im = complex_rotate(self.x[..., :4], self.x[..., 4:], self.angles)
    chex.assert_trees_all_close(out[..., :4], re, atol=1e-5)
    chex.assert_trees_all_close(out[..., 4:], im, atol=1e-5)

  def test_layouts_differ(self):
    a = rope.apply_interleaved(jnp.asarray(self.x), self.cos, self.sin)
    b = rope.apply_half_split(jnp.asarray(self.x), self.cos, self.sin)
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-3)

  def test_no_yarn_is_plain_rope(self):
    inv = rope.yarn_inv_freq(RopeConfig(factor=1.0), 64)
    chex.assert_trees_all_close(inv, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)

  def test_yarn_blends_interpolation_and_extrapolation(self):
    cfg = RopeConfig()  # V3.2: factor 40, original 4096, beta 32/1, dim 64
    inv = rope.yarn_inv_freq(cfg, 64)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    low = math.floor(64 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(10000)))
    high = math.ceil(64 * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(10000)))
    chex.assert_trees_all_close(inv[:low + 1], base[:low + 1], rtol=1e-6)  # high frequencies: extrapolated
    chex.assert_trees_all_close(inv[high:], base[high:] / 40, rtol=1e-6)  # low frequencies: interpolated
    self.assertEqual(cfg.attention_factor, 1.0)
