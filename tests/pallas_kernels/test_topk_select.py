"""Mosaic GPU k-th largest key kernel: interpret mode against `kernel.kth_largest`, and lowering for an H200."""

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

  def test_scalar_k_and_k_beyond_row(self):
    keys = jnp.asarray(np.random.default_rng(time.time_ns()).integers(0, 2**32, (2, 128), np.uint32))
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      top = kernel_select.kth_largest_keys(keys, 1)
      none = kernel_select.kth_largest_keys(keys, 129)
    chex.assert_trees_all_equal(top, keys.max(axis=-1))
    chex.assert_trees_all_equal(none, jnp.zeros(2, jnp.uint32))

  def test_rejects_long_rows(self):
    with self.assertRaisesRegex(ValueError, "too long"):
      kernel_select.kth_largest_keys(jnp.zeros((1, 16385), jnp.uint32), 1)

  def test_lowers_for_h200(self):
    """1024 rows of 16384 keys: one of the two selections of the pruned top-k at 128K keys, k = 2048."""
    args = (jax.ShapeDtypeStruct((1024, 16384), jnp.uint32), jax.ShapeDtypeStruct((1024,), jnp.int32))
    with jax.sharding.use_abstract_mesh(H200):
      lowered = jax.jit(kernel_select.kth_largest_keys).trace(*args).lower(lowering_platforms=("cuda",))
    self.assertIn("mosaic_gpu", lowered.as_text())


if __name__ == "__main__":
  absltest.main()
