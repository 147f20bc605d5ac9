"""Fused group maxima + k-th largest kernel: interpret mode against `pruned.group_maxima` and the bisections, the
whole `inner="group_select"` pruned top-k against the reference, and lowering for an H200."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.topk import api, kernel, kernel_group_select, kernel_select, pruned, reference

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))
INTERPRET = plgpu.InterpretGPUParams(detect_races=True)


def _scores(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
  """rows >= 8 rows of n float32 scores with ties, signed zeros, -inf tails and huge magnitudes."""
  x = rng.standard_normal((rows, n)).astype(np.float32)
  x[1] = np.round(x[1] * 2)  # many exact ties (equal group maxima)
  x[2, 3:] = -np.inf  # fewer visible keys (and groups) than k: the threshold is the -inf key
  x[3] = -np.inf  # no visible key
  x[4] = 0.0
  x[4, ::3] = -0.0  # total order: -0.0 < +0.0, also inside one group
  x[4, 5::7] = -1.0
  x[5] = rng.integers(-2, 2, n) * np.float32(1e30)  # huge magnitudes, ties
  x[6, : n // 2] = -np.inf  # ragged row: visible keys only in the second half
  x[7, 10:80] += 10.0  # the top keys packed into few neighbouring groups
  return x


def _keys(ordered: jax.Array) -> jax.Array:
  """Ordered int32 maxima -> the uint32 keys that the threshold is over (`kernel.sortable_keys` order)."""
  return (ordered ^ jnp.int32(-(2**31))).view(jnp.uint32)


class GroupMaximaAndThresholdTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.parameters(
      (16384, 8, 1024),  # 16 chunks through 2 buffers
      (16384, 4, 4096),  # the default chunk, 4 chunks
      (4099, 16, 2048),  # S % g != 0 (-inf padded last group) and S % chunk != 0 (key-0 padded chunk)
      (5000, 8, 1024),  # S % 128 != 0, S % chunk != 0
      (300, 4, 4096),  # one chunk, shorter than the default chunk
      (131072, 8, 4096),  # the production row: 16384 maxima, 32 chunks
  )
  def test_matches_group_maxima_and_bisection(self, n, g, chunk_keys):
    rng = np.random.default_rng(time.time_ns())
    rows = jnp.asarray(_scores(rng, 8, n))
    m = -(-n // g)
    k = jnp.asarray(np.array([1, m // 2, 10, m, m, rng.integers(1, m + 1), 2048 % m + 1, m - 1], np.int32))
    fn = jax.jit(lambda x, k: kernel_group_select.group_maxima_and_threshold(
        x, g, k, chunk_keys=chunk_keys, interpret=INTERPRET))
    maxima, threshold = fn(rows, k)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    want = pruned.group_maxima(rows, g)[1]
    chex.assert_shape(maxima, (8, m))
    self.assertEqual(maxima.dtype, jnp.int32)
    self.assertEqual(threshold.dtype, jnp.uint32)
    chex.assert_trees_all_equal(maxima, want)  # int32 equality: bitwise
    chex.assert_trees_all_equal(threshold, kernel.kth_largest(_keys(want), k, 32, 1))

  @parameterized.parameters((1, None), (2, None), (4, None), (2, 2), (1, 4))
  def test_counting_options(self, bits_per_step, partial_sums):
    """b bits per step, P partial sums: the same maxima and threshold as the XLA group max and bisection, with
    k = 1, m and k > m (threshold 0) among the rows (m = 625 maxima: 5 rows of 128, P falls back to 1 chain)."""
    rng = np.random.default_rng(time.time_ns())
    rows = jnp.asarray(_scores(rng, 8, 5000))
    m = 625
    k = jnp.asarray(np.array([1, m // 2, 10, m, m + 1, rng.integers(1, m + 1), 4 * m, m - 1], np.int32))
    maxima, threshold = jax.jit(lambda x, k: kernel_group_select.group_maxima_and_threshold(
        x, 8, k, chunk_keys=1024, bits_per_step=bits_per_step, partial_sums=partial_sums, interpret=INTERPRET))(
            rows, k)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    want = pruned.group_maxima(rows, 8)[1]
    chex.assert_trees_all_equal(maxima, want)
    chex.assert_trees_all_equal(threshold, kernel.kth_largest(_keys(want), k, 32, 1))

  def test_threshold_matches_select_kernel_and_scalar_k(self):
    rows = jnp.asarray(_scores(np.random.default_rng(time.time_ns()), 8, 8192))
    maxima, threshold = kernel_group_select.group_maxima_and_threshold(rows, 8, 300, chunk_keys=2048,
                                                                       interpret=INTERPRET)
    chex.assert_trees_all_equal(threshold, kernel_select.kth_largest_keys(_keys(maxima), 300, interpret=INTERPRET))
    self.assertFalse(gpu_callbacks.get_races().races_found)

  def test_rejects_unsupported_shapes(self):
    rows = jnp.zeros((2, 4096), jnp.float32)
    with self.assertRaisesRegex(ValueError, r"g=2 is not supported; allowed: \(4, 8, 16\)"):
      kernel_group_select.group_maxima_and_threshold(rows, 2, 10)
    with self.assertRaisesRegex(ValueError, "chunk_keys=1000 is invalid"):
      kernel_group_select.group_maxima_and_threshold(rows, 8, 10, chunk_keys=1000)
    with self.assertRaisesRegex(ValueError, "allowed: at most 16384 groups"):
      kernel_group_select.group_maxima_and_threshold(jnp.zeros((1, 131073), jnp.float32), 8, 10)
    with self.assertRaisesRegex(ValueError, r"group=2 is not supported by inner='group_select'"):
      pruned.topk_indices(rows, 64, group=2, inner="group_select")
    with self.assertRaisesRegex(ValueError, "bits_per_step=8 is invalid"):
      kernel_group_select.group_maxima_and_threshold(rows, 8, 10, bits_per_step=8)

  def test_lowers_for_h200(self):
    """1024 rows of 128K keys, g = 8, k = 2048: the fused kernel alone (default and 64 KiB chunks, and with b = 2
    and 4 bits per bisection step) and the whole pruned top-k around it; and g = 4, 16 at their largest rows
    (16384 groups)."""
    scores = jax.ShapeDtypeStruct((1024, 131072), jnp.float32)
    fused = lambda x: kernel_group_select.group_maxima_and_threshold(x, 8, 2048)
    fused_64k = lambda x: kernel_group_select.group_maxima_and_threshold(x, 8, 2048, chunk_keys=16384)  # 1 CTA/SM
    whole = lambda x: api.topk_indices(x, 2048, implementation="pruned_group_select")
    cases = [(fn, scores) for fn in (fused, fused_64k, whole)]
    for g in (4, 16):
      rows = jax.ShapeDtypeStruct((1024, kernel_group_select.MAX_GROUPS * g), jnp.float32)
      cases.append((lambda x, g=g: kernel_group_select.group_maxima_and_threshold(x, g, 2048), rows))
    for b in (2, 4):  # the counting options: b bits per step (7680 B of reduction scratch at b = 4)
      cases.append((lambda x, b=b: kernel_group_select.group_maxima_and_threshold(x, 8, 2048, bits_per_step=b), scores))
    cases.append((lambda x: kernel_group_select.group_maxima_and_threshold(x, 8, 2048, chunk_keys=16384,
                                                                            bits_per_step=4), scores))
    for fn, arg in cases:
      with jax.sharding.use_abstract_mesh(H200):
        lowered = jax.jit(fn).trace(arg).lower(lowering_platforms=("cuda",))
      self.assertIn("mosaic_gpu", lowered.as_text())


class PrunedGroupSelectTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.parameters(
      (16384, 2048, None),  # g = 4 chosen by group_size
      (20000, 2048, None),  # S % 128 != 0
      (5000, 64, 8),
      (4099, 200, 16),  # S % g != 0
      (131072, 2048, None),  # the production row length: g = 8
      (3000, 2048, None),  # S < 4k: g = 1, the plain select
      (8192, 2048, None),  # group_size 2 -> the kernel's smallest group, 4 (k groups: all kept)
  )
  def test_matches_reference(self, n, k, group):
    scores = jnp.asarray(_scores(np.random.default_rng(time.time_ns()), 8, n))
    got = jax.jit(pruned.topk_indices, static_argnums=(1, 2, 3, 4))(scores, k, group, "group_select", INTERPRET)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    chex.assert_trees_all_equal(got, reference.topk_indices(scores, k))

  def test_leading_axes(self):
    scores = jnp.asarray(_scores(np.random.default_rng(time.time_ns()), 8, 4096)).reshape(2, 4, 4096)
    got = pruned.topk_indices(scores, 256, inner="group_select", interpret=INTERPRET)
    chex.assert_trees_all_equal(got, reference.topk_indices(scores, 256))


if __name__ == "__main__":
  absltest.main()
