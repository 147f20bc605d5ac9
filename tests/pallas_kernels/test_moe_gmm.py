"""Grouped matmul for routed experts: the jax-bundled Mosaic GPU kernels (interpret mode) under our
custom_vjp against `lax.ragged_dot`, and lowering of forward + backward for an H200 on DeepSeek shapes."""

import time
import types
from unittest import mock

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.moe_gmm import api, kernel, kernel_scheduled, reference

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))


def _fake_gpu_devices(core_count):
  """transposed_ragged_dot reads `jax.devices()[0].core_count`, which CPU devices lack."""
  return mock.patch.object(jax, "devices", lambda *_: [types.SimpleNamespace(core_count=core_count)])


def _inputs(seed, M, D, F, group_sizes, dtype=jnp.bfloat16):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (M, D), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[1], (len(group_sizes), D, F), jnp.float32).astype(dtype)
  dy = jax.random.normal(ks[2], (M, F), jnp.float32).astype(dtype)
  return x, w, jnp.array(group_sizes, jnp.int32), dy


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


class GroupedMatmulTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("empty_group_and_unassigned_rows", 96, 128, 256, (20, 0, 70)),  # rows 90..95 belong to no expert
      ("ragged_dims", 80, 100, 72, (33, 47)),  # D, F not tile multiples: the wrapper pads
      # kernel.SCHEDULED_MIN_GROUPS experts: forward and dgrad through kernel_scheduled; M not a tile multiple
      ("many_experts", 100, 64, 128, (3, 0, 1) * 21 + (1,)),
  )
  def test_forward_and_grads_match_reference(self, M, D, F, group_sizes):  # noqa: N803
    x, w, gs, dy = _inputs(time.time_ns(), M, D, F, group_sizes)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)), _fake_gpu_devices(2):
      out, vjp = jax.vjp(lambda x, w: api.grouped_matmul(x, w, gs, implementation="pallas"), x, w)
      grads = vjp(dy)
    want_out, want_vjp = jax.vjp(lambda x, w: reference.grouped_matmul(x, w, gs), x, w)
    chex.assert_shape(out, (M, F))
    chex.assert_trees_all_close(_f32(out), _f32(want_out), atol=0.25, rtol=1e-2)
    chex.assert_trees_all_close(_f32(grads), _f32(want_vjp(dy)), atol=0.25, rtol=1e-2)

  @parameterized.named_parameters(
      ("forward", False, 192, 128, 256, (20, 0, 70, 90)),  # rows 180..191 belong to no expert
      ("dgrad", True, 128, 64, 128, (64, 0, 63)),  # a group boundary one row before a block boundary
  )
  def test_scheduled_kernel_matches_reference(self, transpose_w, M, D, N, group_sizes):  # noqa: N803
    x, w, gs, _ = _inputs(time.time_ns(), M, D, N, group_sizes)
    if transpose_w:
      w = jnp.swapaxes(w, 1, 2)
    tiles = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=2)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
      got = kernel_scheduled.gmm(x, w, gs, transpose_w=transpose_w, **tiles, num_sms=3)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    want = reference.grouped_matmul(x, jnp.swapaxes(w, 1, 2) if transpose_w else w, gs)
    chex.assert_trees_all_close(_f32(got), _f32(want), atol=0.25, rtol=1e-2)

  def test_tile_schedule_lists_each_group_block_pair(self):
    gs = jnp.array([20, 0, 70, 150, 3], jnp.int32)
    got = kernel_scheduled.tile_schedule(gs, 256, 64)
    want = [[0, 0, 0, 20], [2, 0, 20, 44], [2, 1, 0, 26], [3, 1, 26, 38], [3, 2, 0, 64], [3, 3, 0, 48],
            [4, 3, 48, 3], [5, 3, 51, 13], [5, 0, 0, 0]]  # group 5: the 13 rows of no expert
    chex.assert_trees_all_equal(got, jnp.array(want, jnp.int32))

  @parameterized.parameters(dict(), dict(block_m=64, block_n=256))  # the default tiles; the benchmark's for few rows
  def test_scheduled_kernel_lowers_for_h200(self, **tile_sizes):
    """The DeepSeek down projection's forward (2048 -> 7168) and the up projection's dgrad, 256 experts."""
    x = jax.ShapeDtypeStruct((16384 * 8, 2048), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((256,), jnp.int32)
    tiles = kernel.Tiles(gmm_kernel="scheduled", **tile_sizes)
    for w, transpose_w in ((jax.ShapeDtypeStruct((256, 2048, 7168), jnp.bfloat16), False),
                           (jax.ShapeDtypeStruct((256, 7168, 2048), jnp.bfloat16), True)):
      f = lambda x, w, gs, t=transpose_w: kernel.gmm(x, w, gs, transpose_w=t, tiles=tiles)
      with jax.sharding.use_abstract_mesh(H200):
        text = jax.jit(f).trace(x, w, gs).lower(lowering_platforms=("cuda",)).as_text()
      self.assertEqual(text.count("custom_call @mosaic_gpu"), 1)

  def test_auto_kernel_by_expert_count(self):
    self.assertEqual(kernel.resolve_gmm_kernel("auto", 256), "scheduled")
    self.assertEqual(kernel.resolve_gmm_kernel("auto", 32), "bundled")
    self.assertEqual(kernel.resolve_gmm_kernel("bundled", 256), "bundled")

  def test_scheduled_kernel_rejects_bad_tiles(self):
    x, w, gs, _ = _inputs(0, 192, 64, 128, (100, 92))
    with self.assertRaisesRegex(ValueError, r"block_m=192 must be a power of two"):
      kernel_scheduled.gmm(x, w, gs, block_m=192)
    with self.assertRaisesRegex(ValueError, r"must be multiples of block_m=128"):
      kernel_scheduled.gmm(x, w, gs)

  def test_rejects_unknown_kernel(self):
    x, w, gs, _ = _inputs(0, 8, 64, 128, (8,))
    allowed = r"\('auto', 'bundled', 'scheduled'\)"
    with self.assertRaisesRegex(ValueError, r"tiles.gmm_kernel='cutlass' must be one of " + allowed):
      kernel.gmm(x, w, gs, tiles=kernel.Tiles(gmm_kernel="cutlass"))

  def test_reference_gradients(self):
    x, w, gs, _ = _inputs(time.time_ns(), 7, 3, 4, (2, 0, 5), dtype=jnp.float32)
    jax.test_util.check_grads(lambda x, w: reference.grouped_matmul(x, w, gs), (x, w), order=1, modes=("rev",),
                              atol=1e-2, rtol=1e-2)

  def test_forward_and_backward_lower_for_h200(self):
    """DeepSeek routed-expert up projection: 7168 -> 2048, 256 experts, 4096 tokens x 8 active."""
    x = jax.ShapeDtypeStruct((4096 * 8, 7168), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 7168, 2048), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((256,), jnp.int32)
    loss = lambda x, w, gs: jnp.sum(api.grouped_matmul(x, w, gs, implementation="pallas").astype(jnp.float32))
    with jax.sharding.use_abstract_mesh(H200), _fake_gpu_devices(132):
      text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, w, gs).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("custom_call @mosaic_gpu"), 3)  # forward, dgrad, wgrad


if __name__ == "__main__":
  absltest.main()
