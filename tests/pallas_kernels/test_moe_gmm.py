"""Grouped matmul for routed experts: one contract for every implementation of `api.grouped_matmul` (forward and
gradients against a dense float32 computation on fresh random inputs with fixed seeds), run for XLA and for the
Pallas kernels in GPU interpret mode (race detection on, no race allowed); our scheduled kernel and its tile
schedule; cross-lowering for an H200 at DeepSeek shapes."""

import types
from unittest import mock

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.moe_gmm import api, bench, kernel, kernel_scheduled, reference
from tests.pallas_kernels.mosaic_checks import INTERPRET, SMEM_PER_BLOCK, lower_for_h200, no_races


def _fake_gpu_devices(core_count):
  """transposed_ragged_dot reads `jax.devices()[0].core_count`, which CPU devices lack."""
  return mock.patch.object(jax, "devices", lambda *_: [types.SimpleNamespace(core_count=core_count)])


def make_inputs(seed, M, D, F, group_sizes, dtype=jnp.bfloat16):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (M, D), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[1], (len(group_sizes), D, F), jnp.float32).astype(dtype)
  dy = jax.random.normal(ks[2], (M, F), jnp.float32).astype(dtype)
  return x, w, jnp.array(group_sizes, jnp.int32), dy


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _dense_grouped_matmul(x, w, group_sizes):
  """The definition, without lax.ragged_dot: row i times w[e] for the group e whose rows hold i, zero past them."""
  ends = jnp.cumsum(group_sizes)
  rows = jnp.arange(x.shape[0])[:, None]
  member = ((rows >= ends - group_sizes) & (rows < ends)).astype(jnp.float32)  # [M, E]
  return jnp.einsum("me,md,edf->mf", member, x, w)


class GroupedMatmulContract(parameterized.TestCase):
  """What every implementation of `api.grouped_matmul` computes, and its vjp w.r.t. x and w, against the dense
  float32 definition. Runs only through its subclasses (deleted below)."""

  IMPLEMENTATION = None

  def call(self, fn):
    """fn() in the implementation's context."""
    return fn()

  @parameterized.named_parameters(
      ("empty_group_and_unassigned_rows", 96, 128, 256, (20, 0, 70)),  # rows 90..95 belong to no expert
      ("ragged_dims", 80, 100, 72, (33, 47)),  # D, F not tile multiples: the wrapper pads
      # kernel.SCHEDULED_MIN_GROUPS experts: forward and dgrad through kernel_scheduled; M not a tile multiple
      ("many_experts", 100, 64, 128, (3, 0, 1) * 21 + (1,)),
  )
  def test_forward_and_grads_match_reference(self, M, D, F, group_sizes):  # noqa: N803
    x, w, gs, dy = make_inputs(0, M, D, F, group_sizes)

    def run():
      out, vjp = jax.vjp(lambda x, w: api.grouped_matmul(x, w, gs, implementation=self.IMPLEMENTATION), x, w)
      return out, vjp(dy)

    out, grads = self.call(run)
    want_out, want_vjp = jax.vjp(lambda x, w: _dense_grouped_matmul(x, w, gs), *_f32((x, w)))
    chex.assert_shape(out, (M, F))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (x, w))
    chex.assert_trees_all_close(_f32(out), want_out, atol=0.25, rtol=1e-2)
    chex.assert_trees_all_close(_f32(grads), want_vjp(_f32(dy)), atol=0.25, rtol=1e-2)


class TestXLA(GroupedMatmulContract):
  IMPLEMENTATION = "xla"


class TestPallasInterpret(GroupedMatmulContract):
  """The Mosaic GPU kernels (ours and jax's) in GPU interpret mode."""

  IMPLEMENTATION = "pallas"

  def call(self, fn):
    with no_races(min_kernels=3), plgpu.force_gpu_interpret_mode(INTERPRET), _fake_gpu_devices(2):
      return fn()  # the forward, dgrad and wgrad kernels


del GroupedMatmulContract  # the contract runs through its subclasses only


class ScheduledKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("forward", False, 192, 128, 256, (20, 0, 70, 90)),  # rows 180..191 belong to no expert
      ("dgrad", True, 128, 64, 128, (64, 0, 63)),  # a group boundary one row before a block boundary
  )
  def test_matches_reference(self, transpose_w, M, D, N, group_sizes):  # noqa: N803
    x, w, gs, _ = make_inputs(1, M, D, N, group_sizes)
    if transpose_w:
      w = jnp.swapaxes(w, 1, 2)
    tiles = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=2)
    with no_races(), plgpu.force_gpu_interpret_mode(INTERPRET):
      got = kernel_scheduled.gmm(x, w, gs, transpose_w=transpose_w, **tiles, num_sms=3)
    want = reference.grouped_matmul(x, jnp.swapaxes(w, 1, 2) if transpose_w else w, gs)
    chex.assert_trees_all_close(_f32(got), _f32(want), atol=0.25, rtol=1e-2)

  def test_tile_schedule_lists_each_group_block_pair(self):
    gs = jnp.array([20, 0, 70, 150, 3], jnp.int32)
    got = kernel_scheduled.tile_schedule(gs, 256, 64)
    want = [[0, 0, 0, 20], [2, 0, 20, 44], [2, 1, 0, 26], [3, 1, 26, 38], [3, 2, 0, 64], [3, 3, 0, 48],
            [4, 3, 48, 3], [5, 3, 51, 13], [5, 0, 0, 0]]  # group 5: the 13 rows of no expert
    chex.assert_trees_all_equal(got, jnp.array(want, jnp.int32))

  def test_auto_kernel_by_expert_count(self):
    self.assertEqual(kernel.resolve_gmm_kernel("auto", kernel.SCHEDULED_MIN_GROUPS), "scheduled")
    self.assertEqual(kernel.resolve_gmm_kernel("auto", kernel.SCHEDULED_MIN_GROUPS - 1), "bundled")
    self.assertEqual(kernel.resolve_gmm_kernel("bundled", 256), "bundled")

  def test_rejects_bad_tiles(self):
    x, w, gs, _ = make_inputs(0, 192, 64, 128, (100, 92))
    with self.assertRaisesRegex(ValueError, r"block_m=192 must be a power of two"):
      kernel_scheduled.gmm(x, w, gs, block_m=192)
    with self.assertRaisesRegex(ValueError, r"must be multiples of block_m=128"):
      kernel_scheduled.gmm(x, w, gs)

  def test_rejects_unknown_kernel(self):
    x, w, gs, _ = make_inputs(0, 8, 64, 128, (8,))
    allowed = r"\('auto', 'bundled', 'scheduled'\)"
    with self.assertRaisesRegex(ValueError, r"tiles.gmm_kernel='cutlass' must be one of " + allowed):
      kernel.gmm(x, w, gs, tiles=kernel.Tiles(gmm_kernel="cutlass"))

  def test_reference_gradients_by_finite_differences(self):
    x, w, gs, _ = make_inputs(2, 7, 3, 4, (2, 0, 5), dtype=jnp.float32)
    jax.test_util.check_grads(lambda x, w: reference.grouped_matmul(x, w, gs), (x, w), order=1, modes=("rev",),
                              atol=1e-2, rtol=1e-2)


class LoweringTest(absltest.TestCase):
  """Cross-lowering for an H200 at DeepSeek shapes: every kernel is persistent (one CTA per SM of the H200), fits its
  shared memory, loads its tiles by TMA and multiplies them with bf16 wgmma."""

  def assert_persistent(self, kernels, count):
    self.assertLen(kernels, count)
    for lowered in kernels:
      self.assertEqual(lowered.grid, (132, 1, 1))
      self.assertLessEqual(lowered.smem_bytes, SMEM_PER_BLOCK)
      self.assertGreater(lowered.count("nvvm.cp.async.bulk.tensor.shared.cluster.global"), 0)
      wgmma = lowered.count("wgmma.mma_async.sync.aligned")
      self.assertEqual((wgmma > 0, lowered.count(".f32.bf16.bf16")), (True, wgmma))  # all bf16 in, f32 accumulate

  def test_scheduled_kernel(self):
    """The down projection's forward (2048 -> 7168) and the up projection's dgrad, 256 experts."""
    x = jax.ShapeDtypeStruct((16384 * 8, 2048), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((256,), jnp.int32)
    tiles = kernel.Tiles(gmm_kernel="scheduled")
    for w, transpose_w in ((jax.ShapeDtypeStruct((256, 2048, 7168), jnp.bfloat16), False),
                           (jax.ShapeDtypeStruct((256, 7168, 2048), jnp.bfloat16), True)):
      f = lambda x, w, gs, t=transpose_w: kernel.gmm(x, w, gs, transpose_w=t, tiles=tiles)
      self.assert_persistent(lower_for_h200(f, x, w, gs).launches, 1)

  def test_forward_and_backward(self):
    """The up projection (7168 -> 2048), 4096 tokens x 8 active: forward, dgrad and wgrad kernels, with 256
    experts (ours for forward and dgrad) and with 32 (jax's)."""
    x = jax.ShapeDtypeStruct((4096 * 8, 7168), jnp.bfloat16)
    loss = lambda x, w, gs: jnp.sum(api.grouped_matmul(x, w, gs, implementation="pallas").astype(jnp.float32))
    for experts in (256, 32):
      w = jax.ShapeDtypeStruct((experts, 7168, 2048), jnp.bfloat16)
      gs = jax.ShapeDtypeStruct((experts,), jnp.int32)
      with _fake_gpu_devices(132):
        self.assert_persistent(lower_for_h200(jax.value_and_grad(loss, argnums=(0, 1)), x, w, gs).launches, 3)

  def test_rows_not_a_multiple_of_eight(self):
    """The TMA copies tile rows by 8: M = 100 and 1001 rows lower for jax's kernels (4 experts) and ours (64). Interpret
    mode does not check this; on the GPU it failed (`kernel.ROW_MULTIPLE`)."""
    loss = lambda x, w, gs: jnp.sum(api.grouped_matmul(x, w, gs, implementation="pallas").astype(jnp.float32))
    for m, experts in ((100, 4), (100, 64), (1001, 64)):
      x = jax.ShapeDtypeStruct((m, 64), jnp.bfloat16)
      w = jax.ShapeDtypeStruct((experts, 64, 128), jnp.bfloat16)
      gs = jax.ShapeDtypeStruct((experts,), jnp.int32)
      with _fake_gpu_devices(132):
        self.assertLen(lower_for_h200(jax.value_and_grad(loss, argnums=(0, 1)), x, w, gs).launches, 3)


class BenchTest(absltest.TestCase):

  def test_sections(self):
    self.assertEqual(set(bench.SECTIONS), {"moe_gmm", "moe_gmm_tiles"})


if __name__ == "__main__":
  absltest.main()
