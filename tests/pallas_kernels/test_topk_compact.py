"""Threshold-and-compaction top-k kernel (`kernel_compact`) and the pruned select built on it ("fused_select").

Interpret mode cannot run the kernel's inline compaction: there `topk_positions` returns the kernel's threshold
compacted by XLA, so these tests check that path, the pruned select's plumbing and the input checks; the
inline compaction is checked by lowering it for an H200 here and for exactness on the GPU (the topk benchmark
section, including rows full of ties)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.topk import api, kernel, kernel_compact, pruned, reference

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))
INTERPRET = plgpu.InterpretGPUParams(detect_races=True)


def _scores(seed: int, rows: int, n: int) -> jax.Array:
  """Rows with ties (steps of 1/2), -inf (a quarter, one row all -inf but 3) and -0.0 / +0.0."""
  rng = np.random.default_rng(seed)
  x = np.round(rng.standard_normal((rows, n)) * 2).astype(np.float32) / 2
  x[rng.random((rows, n)) < 0.25] = -np.inf
  x[0, 3:] = -np.inf
  x[1, ::5] = -0.0
  return jnp.asarray(x)


class TopkPositionsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.parameters((1024, 64), (300, 300), (2048, 1))
  def test_matches_reference(self, n, k):
    scores = _scores(n + k, 3, n)
    got = kernel_compact.topk_positions(kernel.sortable_keys(scores), k, interpret=INTERPRET)
    np.testing.assert_array_equal(got, reference.topk_indices(scores, k))

  def test_fused_select_matches_reference(self):
    """Both selections of the pruned top-k (4 x 8192 keys, k = 256: groups of 4) and the API name."""
    scores = _scores(0, 4, 8192)
    want = reference.topk_indices(scores, 256)
    np.testing.assert_array_equal(pruned.topk_indices(scores, 256, inner="fused_select", interpret=INTERPRET), want)
    self.assertIn("pruned_fused_select", api.AVAILABLE)

  def test_forced_interpret_mode_falls_back(self):
    """Under `force_gpu_interpret_mode` (as the model's CPU tests run) the XLA compaction stands in too."""
    scores = _scores(1, 2, 512)
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = kernel_compact.topk_positions(kernel.sortable_keys(scores), 40)
    np.testing.assert_array_equal(got, reference.topk_indices(scores, 40))

  def test_rejects_bad_sizes(self):
    with self.assertRaisesRegex(ValueError, r"rows of 20000 keys with k=5: allowed M <= 16384"):
      kernel_compact.topk_positions(jnp.zeros((1, 20000), jnp.uint32), 5)
    with self.assertRaisesRegex(ValueError, r"rows of 128 keys with k=129"):
      kernel_compact.topk_positions(jnp.zeros((1, 128), jnp.uint32), 129)

  @parameterized.parameters(1, 2)
  def test_lowers_for_h200(self, bits_per_step):
    """1024 rows of 16384 keys, k = 2048 (one selection of the pruned top-k at 128K keys), with the inline
    compaction, for the default bisection and b = 2."""
    fn = lambda x: kernel_compact.topk_positions(x, 2048, bits_per_step=bits_per_step)
    with jax.sharding.use_abstract_mesh(H200):
      lowered = jax.jit(fn).trace(jax.ShapeDtypeStruct((1024, 16384), jnp.uint32)).lower(
          lowering_platforms=("cuda",))
    self.assertIn("mosaic_gpu", lowered.as_text())


if __name__ == "__main__":
  absltest.main()
