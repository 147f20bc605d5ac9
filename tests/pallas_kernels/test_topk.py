"""Top-k selection: one contract against `reference.topk_indices`, run by the XLA radix select and by the "pallas"
implementation (pruned select, Mosaic GPU kernels in GPU interpret mode); the kernels' own pieces; and their
lowering for an H200 at production shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.topk import api, kernel_compact, kernel_select, pruned, radix, reference
from tests.pallas_kernels.mosaic_checks import INTERPRET, lower_for_h200, no_races


def hard_scores(seed: int, rows: int, n: int) -> jax.Array:
  """rows >= 8 rows of n float32 scores, each a hard case of the contract."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, n)).astype(np.float32)
  x[1] = np.round(x[1] * 2)  # many exact ties: the lower index must win
  x[2, 3:] = -np.inf  # fewer visible keys than k: -1 slots
  x[3] = -np.inf  # no visible key
  x[4] = 0.0
  x[4, ::3] = -0.0  # total order, as lax.top_k: -0.0 < +0.0, also inside one group
  x[5] = rng.integers(-2, 2, n) * np.float32(1e30)  # huge magnitudes, ties
  x[6, : n // 2] = -np.inf  # ragged row: visible keys only in the second half
  x[7, 10:80] += 10.0  # the top keys packed into few neighbouring groups
  return jnp.asarray(x)


class TopkContract(parameterized.TestCase):
  """What every top-k implementation meets; subclasses define `topk`."""

  def topk(self, scores: jax.Array, k: int) -> jax.Array:
    raise NotImplementedError

  @parameterized.parameters(
      (1000, 64),  # pruned: groups of 4
      (257, 256),  # k close to S: selected directly
      (37, 50),  # k > S: min(k, S) slots
      (128, 1),
      (8192, 256),  # groups of 2
      (20001, 2048),  # S % g != 0
      (20000, 6000),  # selected directly over rows longer than the kernel takes: the XLA fallback
  )
  def test_matches_reference(self, n, k):
    scores = hard_scores(n + k, 8, n)
    got = self.topk(scores, k)
    chex.assert_shape(got, (8, min(k, n)))
    chex.assert_trees_all_equal(got, reference.topk_indices(scores, k))

  def test_leading_axes(self):
    scores = hard_scores(1, 8, 1000).reshape(2, 4, 1000)
    chex.assert_trees_all_equal(self.topk(scores, 40), reference.topk_indices(scores, 40))


class RadixTopkTest(TopkContract):
  """The XLA radix select (`radix.py`): the pruned select's fallback for long rows."""

  def topk(self, scores, k):
    *lead, n = scores.shape
    keys = radix.sortable_keys(scores.reshape(-1, n))
    return jax.jit(radix.topk_positions, static_argnums=1)(keys, min(k, n)).reshape(*lead, min(k, n))


class PallasInterpretTopkTest(TopkContract):
  """`api.topk_indices(implementation="pallas")` in GPU interpret mode with race detection."""

  def topk(self, scores, k):
    with no_races(min_kernels=0), plgpu.force_gpu_interpret_mode(INTERPRET):  # 0: the XLA fallback
      return jax.jit(api.topk_indices, static_argnums=(1, 2))(scores, k, "pallas")

  @parameterized.parameters((1000, 8, 16), (130, 16, 8), (4096, 256, 4), (4099, 200, 16))
  def test_forced_group_sizes(self, n, k, group):
    scores = hard_scores(n, 8, n)
    with no_races():
      got = jax.jit(pruned.topk_indices, static_argnums=(1, 2, 3))(scores, k, group, INTERPRET)
    chex.assert_trees_all_equal(got, reference.topk_indices(scores, k))

  def test_group_choice_and_errors(self):
    self.assertEqual(pruned.group_size(131072, 2048), 8)
    self.assertEqual(pruned.group_size(4096, 2048), 1)
    with self.assertRaisesRegex(ValueError, "group=64 is invalid"):
      pruned.topk_indices(jnp.zeros((2, 1000)), 64, group=64)
    with self.assertRaisesRegex(ValueError, r"implementation='radix' is not available here"):
      api.topk_indices(jnp.zeros((2, 1000)), 64, implementation="radix")


def _hard_keys(seed: int, n: int) -> tuple[jax.Array, jax.Array]:
  """8 rows of n uint32 keys that stress the bisection -> (keys [8, n], k int32 [8]): heavy ties on and off the
  2-bit digit boundaries, all-equal rows (the maximum key, a random key, the padding key 0), keys just below a
  power of two, and k = 1, n, n + 1, 10 n (more than the row: 0) and 0 (every x qualifies: 0xFFFFFFFF)."""
  rng = np.random.default_rng(seed)
  keys = rng.integers(0, 2**32, (8, n), np.uint64).astype(np.uint32)
  keys[1] = rng.integers(0, 4, n).astype(np.uint32) << np.uint32(30)
  keys[2] = rng.choice(rng.integers(0, 2**32, 5, np.uint64).astype(np.uint32), n)
  keys[3] = 0xFFFFFFFF
  keys[4] = rng.integers(0, 2**32, dtype=np.uint64)
  keys[5] = 0
  keys[6] = (np.uint32(1) << rng.integers(1, 32, n).astype(np.uint32)) - rng.integers(0, 2, n).astype(np.uint32)
  k = np.array([1, rng.integers(1, n + 1), n, 10 * n, n, 0, rng.integers(1, n + 1), n + 1], np.int32)
  return jnp.asarray(keys), jnp.asarray(k)


class KthLargestKeysTest(parameterized.TestCase):
  """The threshold kernel (`kernel_select`, also the first half of `kernel_compact`) against the XLA bisection."""

  @parameterized.product(n=(1000, 384, 16384), bits_per_step=(1, 2))  # 1000: padded with key 0; 16384: the maximum
  def test_matches_xla_bisection(self, n, bits_per_step):
    for keys, k in (_hard_keys(n, n), (radix.sortable_keys(hard_scores(n, 8, n)), jnp.arange(1, 9) * (n // 8))):
      with no_races():
        got = jax.jit(lambda x, k: kernel_select.kth_largest_keys(x, k, bits_per_step=bits_per_step,
                                                                  interpret=INTERPRET))(keys, k)
      self.assertEqual(got.dtype, jnp.uint32)
      chex.assert_trees_all_equal(got, radix.kth_largest(keys, k))

  def test_scalar_k_and_k_beyond_row(self):
    keys = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, (2, 128), np.uint32))
    with no_races():
      top, none = (kernel_select.kth_largest_keys(keys, k, interpret=INTERPRET) for k in (1, 129))
    chex.assert_trees_all_equal(top, keys.max(axis=-1))
    chex.assert_trees_all_equal(none, jnp.zeros(2, jnp.uint32))

  def test_rejects_bad_rows_and_options(self):
    with self.assertRaisesRegex(ValueError, "too long"):
      kernel_select.kth_largest_keys(jnp.zeros((1, 16385), jnp.uint32), 1)
    with self.assertRaisesRegex(ValueError, r"bits_per_step=4 is invalid; allowed: \(1, 2\)"):
      kernel_select.kth_largest_keys(jnp.zeros((1, 128), jnp.uint32), 1, bits_per_step=4)
    with self.assertRaisesRegex(ValueError, r"rows of 20000 keys with k=5: allowed M <= 16384"):
      kernel_compact.topk_positions(jnp.zeros((1, 20000), jnp.uint32), 5)
    with self.assertRaisesRegex(ValueError, r"rows of 128 keys with k=129"):
      kernel_compact.topk_positions(jnp.zeros((1, 128), jnp.uint32), 129)


class LoweringTest(parameterized.TestCase):
  """The Mosaic GPU lowering at production shapes (1024 query rows of a 128K-token layer, k = 2048)."""

  @parameterized.parameters(1, 2)
  def test_compaction_kernel(self, bits_per_step):
    """One selection: 1024 rows of 16384 keys, one CTA of one warpgroup per row, the row and the counts in SMEM;
    ballots and a shuffle scan compact it; 2 bits per step reduce the counts with `redux.sync`."""
    (launch,) = lower_for_h200(lambda x: kernel_compact.topk_positions(x, 2048, bits_per_step=bits_per_step),
                               jax.ShapeDtypeStruct((1024, 16384), jnp.uint32)).launches
    self.assertEqual((launch.grid, launch.block), ((1024, 1, 1), (128, 1, 1)))
    self.assertGreaterEqual(launch.smem_bytes, 64 * 1024 + 2 * 4 * 128 * 4)  # the row and the counts
    self.assertLessEqual(3 * launch.smem_bytes, 228 * 1024)  # 3 CTAs per SM still fit
    self.assertGreater(launch.ops["nvvm.vote.sync"], 0)
    self.assertGreater(launch.ops["nvvm.shfl.sync"], 0)
    self.assertEqual(launch.ops["nvvm.redux.sync"] > 0, bits_per_step == 2)

  def test_threshold_kernel(self):
    (launch,) = lower_for_h200(lambda x, k: kernel_select.kth_largest_keys(x, k),
                               jax.ShapeDtypeStruct((1024, 16384), jnp.uint32),
                               jax.ShapeDtypeStruct((1024,), jnp.int32)).launches
    self.assertEqual((launch.grid, launch.block, launch.smem_bytes), ((1024, 1, 1), (128, 1, 1), 67592))

  def test_pruned_select_sorts_nothing(self):
    """The default select at 1024 x 128K: two compaction kernels (16K group maxima, then 8 x 2048 candidates)."""
    lowered = lower_for_h200(lambda x: api.topk_indices(x, 2048, implementation="pallas"),
                             jax.ShapeDtypeStruct((1024, 131072), jnp.float32))
    self.assertLen(lowered.launches, 2)
    self.assertTrue(all(launch.grid == (1024, 1, 1) for launch in lowered.launches))
    self.assertNotIn("stablehlo.sort", lowered.text)


del TopkContract  # abstract: run through its subclasses only

if __name__ == "__main__":
  absltest.main()
