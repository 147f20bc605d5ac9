"""Mosaic GPU k-th largest key kernel: interpret mode against `kernel.kth_largest` (the default and the counting
options: b bits per step, P partial sums), and lowering for an H200."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.topk import kernel, kernel_select

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))
INTERPRET = plgpu.InterpretGPUParams(detect_races=True)


def _rows(rng: np.random.Generator, n: int) -> tuple[jax.Array, jax.Array]:
  """6 rows of n sortable keys with ties, -inf and the k extremes -> (keys uint32 [6, n], k int32 [6])."""
  x = rng.standard_normal((6, n)).astype(np.float32)
  x[1] = np.round(x[1] * 2)  # many exact ties
  x[2, 3:] = -np.inf  # fewer finite keys than k: the threshold is the -inf key
  x[3] = -np.inf  # no finite key, k = n
  x[4, ::3] = -0.0  # -0.0 < +0.0 in the key order
  x[4, 1::3] = 0.0
  k = np.array([1, n // 2, 10, n, n, rng.integers(1, n + 1)], np.int32)
  return kernel.sortable_keys(jnp.asarray(x)), jnp.asarray(k)


def _hard_rows(rng: np.random.Generator, n: int) -> tuple[jax.Array, jax.Array]:
  """8 rows of n uint32 keys that stress the b-bit steps -> (keys uint32 [8, n], k int32 [8]): heavy ties on and
  off the digit boundaries, all-equal rows (0, the maximum key, a random key), keys just below a power of two,
  and k = 1, n, n + 1 and 10 n (more than the row: 0), 0 (every x qualifies: 0xFFFFFFFF)."""
  keys = rng.integers(0, 2**32, (8, n), np.uint64).astype(np.uint32)
  keys[1] = rng.integers(0, 4, n).astype(np.uint32) << np.uint32(30)  # 4 values, all on a 2-bit digit boundary
  keys[2] = rng.choice(rng.integers(0, 2**32, 5, np.uint64).astype(np.uint32), n)  # 5 arbitrary values, ties
  keys[3] = 0xFFFFFFFF  # all equal, the largest digit at every step
  keys[4] = rng.integers(0, 2**32, dtype=np.uint64)  # all equal, random
  keys[5] = 0  # all equal to the padding key
  keys[6] = (np.uint32(1) << rng.integers(1, 32, n).astype(np.uint32)) - rng.integers(0, 2, n).astype(np.uint32)
  k = np.array([1, rng.integers(1, n + 1), n, 10 * n, n, 0, rng.integers(1, n + 1), n + 1], np.int32)
  return jnp.asarray(keys), jnp.asarray(k)


class KthLargestKeysTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.parameters(1024, 300, 16384)  # 300: padded to 384 with key 0; 16384: the production row
  def test_matches_xla_bisection(self, n):
    keys, k = _rows(np.random.default_rng(time.time_ns()), n)
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = jax.jit(kernel_select.kth_largest_keys)(keys, k)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    chex.assert_shape(got, (6,))
    self.assertEqual(got.dtype, jnp.uint32)
    chex.assert_trees_all_equal(got, kernel.kth_largest(keys, k, 32, 1))

  @parameterized.product(bits_per_step=(1, 2, 4), partial_sums=(None, 1, 4))
  def test_counting_options_match_xla_bisection(self, bits_per_step, partial_sums):
    """b bits per step with P partial sums: the same threshold as the XLA bisection (and so as b = 1), on rows
    of 1000 keys (padded to 1024 with key 0) and 384 keys (3 rows of 128: P = 4 falls back to 1 chain)."""
    rng = np.random.default_rng(time.time_ns())
    fn = jax.jit(lambda x, k: kernel_select.kth_largest_keys(x, k, bits_per_step=bits_per_step,
                                                             partial_sums=partial_sums, interpret=INTERPRET))
    for n in (1000, 384):
      keys, k = _hard_rows(rng, n)
      got = fn(keys, k)
      self.assertFalse(gpu_callbacks.get_races().races_found)
      self.assertEqual(got.dtype, jnp.uint32)
      chex.assert_trees_all_equal(got, kernel.kth_largest(keys, k, 32, 1))
    keys, k = _rows(rng, 300)  # sortable keys: ties, -0.0 / +0.0, -inf rows, k = n
    chex.assert_trees_all_equal(fn(keys, k), kernel.kth_largest(keys, k, 32, 1))

  @parameterized.parameters(2, 4)
  def test_counting_options_production_row(self, bits_per_step):
    keys, k = _rows(np.random.default_rng(time.time_ns()), 16384)
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = jax.jit(lambda x, k: kernel_select.kth_largest_keys(x, k, bits_per_step=bits_per_step))(keys, k)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    chex.assert_trees_all_equal(got, kernel.kth_largest(keys, k, 32, 1))

  def test_scalar_k_and_k_beyond_row(self):
    keys = jnp.asarray(np.random.default_rng(time.time_ns()).integers(0, 2**32, (2, 128), np.uint32))
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      top = kernel_select.kth_largest_keys(keys, 1)
      none = kernel_select.kth_largest_keys(keys, 129)
    chex.assert_trees_all_equal(top, keys.max(axis=-1))
    chex.assert_trees_all_equal(none, jnp.zeros(2, jnp.uint32))

  def test_rejects_long_rows_and_bad_options(self):
    with self.assertRaisesRegex(ValueError, "too long"):
      kernel_select.kth_largest_keys(jnp.zeros((1, 16385), jnp.uint32), 1)
    with self.assertRaisesRegex(ValueError, r"bits_per_step=3 is invalid; allowed: \(1, 2, 4\)"):
      kernel_select.kth_largest_keys(jnp.zeros((1, 128), jnp.uint32), 1, bits_per_step=3)
    with self.assertRaisesRegex(ValueError, "partial_sums=3 is invalid"):
      kernel_select.kth_largest_keys(jnp.zeros((1, 128), jnp.uint32), 1, partial_sums=3)

  @parameterized.parameters((1, None), (2, None), (4, None), (1, 4))
  def test_lowers_for_h200(self, bits_per_step, partial_sums):
    """1024 rows of 16384 keys: one of the two selections of the pruned top-k at 128K keys, k = 2048; the
    default, b = 2 and 4 (stacked counts, Lane semantics, 7680 B of reduction scratch at b = 4) and P = 4."""
    args = (jax.ShapeDtypeStruct((1024, 16384), jnp.uint32), jax.ShapeDtypeStruct((1024,), jnp.int32))
    fn = lambda x, k: kernel_select.kth_largest_keys(x, k, bits_per_step=bits_per_step, partial_sums=partial_sums)
    with jax.sharding.use_abstract_mesh(H200):
      lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    self.assertIn("mosaic_gpu", lowered.as_text())


if __name__ == "__main__":
  absltest.main()
