"""Radix and pruned top-k against the reference (exactness, ties, -inf rows, rows with < k keys) and its GPU lowering."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.topk import api, kernel, pruned, reference

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))


def _scores(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
  x = rng.standard_normal((rows, n)).astype(np.float32)
  x[1] = np.round(x[1] * 2)  # many exact ties: lower index must win
  x[2, 3:] = -np.inf  # fewer visible keys than k
  x[3] = -np.inf  # no visible key
  x[4] = 0.0
  x[4, ::3] = -0.0  # total order, as lax.top_k: -0.0 < +0.0
  x[5] = rng.integers(-2, 2, n) * np.float32(1e30)  # huge magnitudes, ties
  x[6, : n // 2] = -np.inf  # ragged row: visible keys only in the second half
  x[7, 10:80] += 10.0  # the top keys packed into few neighbouring groups
  return x


class RadixTopkTest(parameterized.TestCase):

  @parameterized.parameters((1000, 64), (257, 256), (37, 50), (4096, 2048), (128, 1))
  def test_matches_reference(self, n, k):
    rng = np.random.default_rng(time.time_ns())
    scores = jnp.asarray(_scores(rng, 8, n))
    got = jax.jit(api.topk_indices, static_argnums=(1, 2))(scores, k, "radix")
    chex.assert_shape(got, (8, min(k, n)))
    chex.assert_trees_all_equal(got, reference.topk_indices(scores, k))

  @parameterized.product(case=((1000, 64, None), (1000, 8, 16), (130, 16, 8), (4096, 256, 4), (20000, 2048, None)),
                          inner=pruned.INNER)
  def test_pruned_matches_reference(self, case, inner):
    n, k, group = case
    scores = jnp.asarray(_scores(np.random.default_rng(time.time_ns()), 8, n))
    interpret = plgpu.InterpretGPUParams(detect_races=True) if inner in ("select", "group_select", "fused_select") else False
    got = jax.jit(pruned.topk_indices, static_argnums=(1, 2, 3, 4))(scores, k, group, inner, interpret)
    chex.assert_trees_all_equal(got, reference.topk_indices(scores, k))

  def test_pruned_group_choice_and_errors(self):
    self.assertEqual(pruned.group_size(131072, 2048), 8)
    self.assertEqual(pruned.group_size(4096, 2048), 1)
    with self.assertRaisesRegex(ValueError, "group=64 is invalid"):
      pruned.topk_indices(jnp.zeros((2, 1000)), 64, group=64)
    with self.assertRaisesRegex(ValueError, "inner='sort' is invalid"):
      pruned.topk_indices(jnp.zeros((2, 1000)), 64, inner="sort")

  def test_leading_axes(self):
    scores = jnp.asarray(_scores(np.random.default_rng(time.time_ns()), 12, 300)).reshape(2, 6, 300)
    chex.assert_trees_all_equal(kernel.topk_indices(scores, 40), reference.topk_indices(scores, 40))

  def test_lowers_for_h200_at_production_shape(self):
    """1024 query rows of 128K keys, k = 2048 (one row block of a 128K-token layer)."""
    scores = jax.ShapeDtypeStruct((1024, 131072), jnp.float32)
    pruned_select = lambda x, k: pruned.topk_indices(x, k, inner="select")  # the Mosaic GPU threshold kernel
    group_select = lambda x, k: pruned.topk_indices(x, k, inner="group_select")  # the fused group-max kernel
    for select in (kernel.topk_indices, pruned.topk_indices, pruned_select, group_select):
      with jax.sharding.use_abstract_mesh(H200):
        lowered = jax.jit(select, static_argnums=1).trace(scores, 2048).lower(lowering_platforms=("cuda",))
      self.assertIn("stablehlo", lowered.as_text()[:2000])
