"""Mosaic GPU lightning-indexer kernel: interpret mode against the reference, and lowering for an H200."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.lightning_indexer import api, kernel, kernel_fp8, reference
from pallas_kernels.topk import reference as topk_reference

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))
INTERPRET = plgpu.InterpretGPUParams(detect_races=True)


def _inputs(seed, B, T, S, I, H, boundary):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, I, H), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, S, H), jnp.bfloat16)
  w = jax.random.normal(ks[2], (B, T, I)) * I**-0.5 * H**-0.5
  q_positions = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  vis = dict(q_positions=q_positions, kv_positions=kv_positions,
             q_segment_ids=(q_positions >= boundary).astype(jnp.int32),
             kv_segment_ids=(kv_positions >= boundary).astype(jnp.int32))
  return (q, k, w), vis


def _fp8_inputs(seed, B, T, S, I, H, boundary):  # noqa: N803
  """Quantised inputs whose rows span many binades, so the q and k scales differ per row."""
  (q, k, w), vis = _inputs(seed, B, T, S, I, H, boundary)
  ks = jax.random.split(jax.random.key(seed + 1), 2)
  q = q.astype(jnp.float32) * jnp.exp2(jax.random.randint(ks[0], (B, T, I, 1), -12, 12))
  k = k.astype(jnp.float32) * jnp.exp2(jax.random.randint(ks[1], (B, S, 1), -12, 12))
  return (*api.quantize_fp8(q, k), w), vis


def _assert_scores_close(got, want):
  chex.assert_trees_all_equal(jnp.isneginf(got), jnp.isneginf(want))
  finite = jnp.isfinite(want)
  chex.assert_trees_all_close(jnp.where(finite, got, 0.0), jnp.where(finite, want, 0.0), rtol=1e-5, atol=1e-5)


def _check_kernel_scores(test, scores_fn, reference_fn, args, vis, shape):
  """The Pallas path of `scores_fn` in interpret mode: no races, shape, close to `reference_fn`."""
  with plgpu.force_gpu_interpret_mode(INTERPRET):
    got = jax.jit(lambda *a: scores_fn(*a, **vis, implementation="pallas"))(*args)
  test.assertFalse(gpu_callbacks.get_races().races_found)
  chex.assert_shape(got, shape)
  _assert_scores_close(got, reference_fn(*args, **vis))


class PallasIndexerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.named_parameters(
      ("aligned_segments", 1, 128, 256, 200),  # a document boundary inside a tile; early tiles skipped
      ("ragged", 1, 100, 190, 0),  # T, S not tile multiples: the API pads
  )
  def test_scores_match_reference(self, B, T, S, boundary):  # noqa: N803
    args, vis = _inputs(time.time_ns(), B, T, S, 4, 128, boundary)
    _check_kernel_scores(self, api.index_scores, reference.index_scores, args, vis, (B, T, S))

  def test_topk_matches_reference(self):
    """Row blocks of 64 queries, k larger than the early rows' visible counts."""
    args, vis = _inputs(time.time_ns(), 1, 128, 128, 2, 128, 40)
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = api.index_topk(*args, topk=48, **vis, implementation="pallas", rows_per_block=64,
                            select_implementation="radix")
    scores = reference.index_scores(*args, **vis)
    want = topk_reference.topk_indices(scores, 48)
    # bf16 products summed in another order can swap near-equal neighbours at the k-th place: compare the
    # selected score mass instead of the exact sets when they differ.
    picked = lambda idx: jnp.where(idx >= 0, jnp.take_along_axis(scores, jnp.maximum(idx, 0), -1), 0.0).sum(-1)
    chex.assert_trees_all_equal(got >= 0, want >= 0)
    np.testing.assert_allclose(picked(got), picked(want), rtol=1e-5)

  @parameterized.named_parameters(
      ("one_document", [0] * 512, True),
      ("packed_documents", [0] * 200 + [1] * 250 + [2] * 62, True),
      ("segment_reappears", [0] * 200 + [1] * 250 + [0] * 62, False),  # early queries see the last 62 keys
  )
  def test_causal_prefix_stages_select_the_same(self, segments, stageable):
    """8 row blocks in causal stages (key prefixes of 128 to 512) select exactly what the full rows select, and the
    automatic choice (causal_prefix=None) falls back to all keys where the stages would lose visible keys."""
    seg = jnp.asarray(segments, jnp.int32)[None]
    starts = jnp.concatenate([jnp.ones((1, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = jnp.arange(512)[None] - jax.lax.cummax(jnp.where(starts, jnp.arange(512)[None], 0), axis=1)
    vis = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    self.assertEqual(bool(api.keys_precede_queries(**vis)), stageable)
    args, _ = _inputs(time.time_ns(), 1, 512, 512, 2, 128, 0)
    topk = lambda causal_prefix: api.index_topk(*args, topk=96, **vis, implementation="pallas", rows_per_block=64,
                                                select_implementation="radix", causal_prefix=causal_prefix)
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      full, auto, staged = (jax.jit(lambda c=c: topk(c))() for c in (False, None, True))
    chex.assert_trees_all_equal(auto, full)
    self.assertEqual(bool(jnp.array_equal(staged, full)), stageable)
    scores = reference.index_scores(*args, **vis)
    chex.assert_trees_all_equal(full >= 0, topk_reference.topk_indices(scores, 96) >= 0)

  def test_rejects_no_causal_stages(self):
    args, vis = _inputs(0, 1, 64, 128, 2, 128, 0)
    with self.assertRaisesRegex(ValueError, r"causal_stages=0 must be at least 1"):
      api.index_topk(*args, topk=8, **vis, implementation="pallas", causal_stages=0)

  def test_keys_precede_queries_checks(self):
    pos = jnp.arange(8)[None]
    seg = jnp.zeros_like(pos)
    check = lambda qp=pos, kp=pos, qs=seg, ks=seg: bool(api.keys_precede_queries(qp, kp, qs, ks))
    self.assertTrue(check())
    self.assertFalse(check(kp=pos.at[0, 5].set(2), qp=pos.at[0, 5].set(2)))  # a later key at an earlier position
    self.assertFalse(check(qp=pos[:, :4]))  # queries are not the keys' tokens
    self.assertFalse(check(qs=seg.at[0, 3].set(1)))

  def test_gradient_falls_back_to_reference(self):
    args, vis = _inputs(time.time_ns(), 1, 64, 128, 2, 128, 0)
    f = lambda impl: lambda *a: jnp.where(jnp.isfinite(s := api.index_scores(*a, **vis, implementation=impl)),
                                          s, 0.0).sum()
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = jax.grad(f("pallas"), argnums=(0, 1, 2))(*args)
    chex.assert_trees_all_close(got, jax.grad(f("xla"), argnums=(0, 1, 2))(*args), rtol=1e-5, atol=1e-5)


class PallasFP8IndexerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.named_parameters(
      ("aligned_segments", 1, 128, 256, 200),
      ("ragged", 2, 100, 190, 70),
  )
  def test_scores_match_reference(self, B, T, S, boundary):  # noqa: N803
    args, vis = _fp8_inputs(time.time_ns(), B, T, S, 4, 128, boundary)
    _check_kernel_scores(self, api.index_scores_fp8, reference.index_scores_fp8, args, vis, (B, T, S))

  def test_requantising_dequantised_inputs_is_exact(self):
    """The model's fp8_numerics hands index_topk dequantised tensors; fp8=True must score them unchanged."""
    (q8, q_scale, k8, k_scale, w), vis = _fp8_inputs(time.time_ns(), 1, 64, 128, 4, 128, 0)
    q, k = q8.astype(jnp.float32), k8.astype(jnp.float32) * k_scale[..., None]
    exact = reference.index_scores(q, k, w * q_scale, **vis)
    chex.assert_trees_all_equal(reference.index_scores_fp8(*api.quantize_fp8(q, k), w * q_scale, **vis), exact)
    topk = lambda fp8: api.index_topk(q, k, w * q_scale, topk=16, **vis, implementation="xla", fp8=fp8)
    chex.assert_trees_all_equal(topk(True), topk(False))

  def test_topk_matches_reference(self):
    (q8, q_scale, k8, k_scale, w), vis = _fp8_inputs(time.time_ns(), 1, 128, 128, 2, 128, 40)
    q, k = q8.astype(jnp.float32) * q_scale[..., None], k8.astype(jnp.float32) * k_scale[..., None]
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = api.index_topk(q, k, w, topk=48, **vis, implementation="pallas", rows_per_block=64, fp8=True)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    scores = reference.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis)
    want = topk_reference.topk_indices(scores, 48)
    picked = lambda idx: jnp.where(idx >= 0, jnp.take_along_axis(scores, jnp.maximum(idx, 0), -1), 0.0).sum(-1)
    chex.assert_trees_all_equal(got >= 0, want >= 0)
    np.testing.assert_allclose(picked(got), picked(want), rtol=1e-5)


class PipelineOptionsTest(parameterized.TestCase):
  """The scores kernel's pipeline options other than the default (2 heads per step, 2 query buffers, which the tests
  above run): 1 head per step, 4 buffers."""

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.parameters((1, 4, 1), (1, 2, 1), (2, 4, 1), (2, 2, 2), (1, 3, 2))
  def test_options_match_reference(self, heads_per_step, steps, key_warpgroups):
    args, vis = _inputs(time.time_ns(), 1, 128, 512, 6, 128, 475)  # a new segment from query row 91
    scores = lambda q, k, w, implementation, **vis: kernel.index_scores(
        q, k, w, **vis, max_concurrent_steps=steps, heads_per_step=heads_per_step, key_warpgroups=key_warpgroups)
    _check_kernel_scores(self, scores, reference.index_scores, args, vis, (1, 128, 512))

  def test_two_key_warpgroups_fp8(self):
    (q8, q_scale, k8, k_scale, w), vis = _fp8_inputs(time.time_ns(), 1, 64, 512, 4, 128, 0)
    with plgpu.force_gpu_interpret_mode(INTERPRET):
      got = kernel_fp8.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis, key_warpgroups=2)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    _assert_scores_close(got, reference.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis))

  def test_rejects_bad_depth(self):
    args, vis = _inputs(0, 1, 64, 128, 4, 128, 0)
    with self.assertRaisesRegex(ValueError, r"max_concurrent_steps=5 must be in \[1, 4\]"):
      kernel.index_scores(*args, **vis, max_concurrent_steps=5)
    with self.assertRaisesRegex(ValueError, r"heads_per_step=3 must be one of \(1, 2\) and divide the 4 index"):
      kernel.index_scores(*args, **vis, heads_per_step=3)
    with self.assertRaisesRegex(ValueError, r"key_warpgroups=3 must be one of \(1, 2\)"):
      kernel.index_scores(*args, **vis, key_warpgroups=3)
    with self.assertRaisesRegex(ValueError, r"S=128 of 256 \(key_warpgroups=2\)"):
      kernel.index_scores(*args, **vis, key_warpgroups=2)

  @parameterized.parameters((1, 4, 1), (1, 2, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2))
  def test_options_lower_for_h200(self, heads_per_step, steps, key_warpgroups):
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 4096, 64, 128), jnp.bfloat16), sd((1, 131072, 128), jnp.bfloat16), sd((1, 4096, 64), jnp.float32))
    vis = (sd((1, 4096), jnp.int32), sd((1, 131072), jnp.int32)) * 2
    f = lambda q, k, w, qp, kp, qs, ks: kernel.index_scores(q, k, w, q_positions=qp, kv_positions=kp, q_segment_ids=qs,
                                                            kv_segment_ids=ks, max_concurrent_steps=steps,
                                                            heads_per_step=heads_per_step,
                                                            key_warpgroups=key_warpgroups)
    with jax.sharding.use_abstract_mesh(H200):
      lowered = jax.jit(f).trace(*args, vis[0], vis[1], vis[2], vis[3]).lower(lowering_platforms=("cuda",))
    self.assertIn("mosaic_gpu", lowered.as_text())


class LoweringTest(parameterized.TestCase):
  """Production shapes (T = S = 128K, 64 x 128, k = 2048) through the whole Mosaic GPU lowering."""

  @parameterized.named_parameters(("bf16", False), ("fp8", True))  # fp8: e4m3 wgmma needs K-major operands
  def test_index_topk_lowers_for_h200(self, fp8):
    sd = jax.ShapeDtypeStruct
    T = 131072  # noqa: N806
    args = (sd((1, T, 64, 128), jnp.bfloat16), sd((1, T, 128), jnp.bfloat16), sd((1, T, 64), jnp.float32),
            *[sd((1, T), jnp.int32)] * 4)

    def f(q, k, w, q_pos, kv_pos, q_seg, kv_seg):  # fp8 over all keys only: the 32 causal stages lower in bf16
      return api.index_topk(q, k, w, topk=2048, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                            kv_segment_ids=kv_seg, implementation="pallas", fp8=fp8,
                            causal_prefix=False if fp8 else None)

    with jax.sharding.use_abstract_mesh(H200):
      lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    self.assertIn("mosaic_gpu", lowered.as_text())
