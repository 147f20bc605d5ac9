"""Lightning-indexer scores and index_topk: one contract against the reference, run by the Mosaic GPU kernels in GPU
interpret mode (bf16 and FP8, with one and two key warpgroups), the causal key-prefix stages, and the lowering of
index_topk for an H200 at T = 128K."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.lightning_indexer import api, kernel, reference
from pallas_kernels.topk import reference as topk_reference
from tests.pallas_kernels.mosaic_checks import INTERPRET, lower_for_h200, no_races


def make_inputs(seed, B, T, S, I, H, boundary):  # noqa: N803
  """bf16 inputs; queries are the last T of S positions, a document starts at position `boundary`."""
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


def dequantised_fp8_inputs(seed, B, T, S, I, H, boundary):  # noqa: N803
  """float32 e4m3 values times ue8m0 scales whose rows span many binades (so the q and k scales differ per row),
  as the model's fp8_numerics hands them over: quantising them again is exact."""
  (q, k, w), vis = make_inputs(seed, B, T, S, I, H, boundary)
  ks = jax.random.split(jax.random.key(seed + 1), 2)
  q = q.astype(jnp.float32) * jnp.exp2(jax.random.randint(ks[0], (B, T, I, 1), -12, 12))
  k = k.astype(jnp.float32) * jnp.exp2(jax.random.randint(ks[1], (B, S, 1), -12, 12))
  q8, q_scale, k8, k_scale = api.quantize_fp8(q, k)
  return (q8.astype(jnp.float32) * q_scale[..., None], k8.astype(jnp.float32) * k_scale[..., None], w), vis


def _assert_scores_close(got, want):
  chex.assert_trees_all_equal(jnp.isneginf(got), jnp.isneginf(want))
  finite = jnp.isfinite(want)
  chex.assert_trees_all_close(jnp.where(finite, got, 0.0), jnp.where(finite, want, 0.0), rtol=1e-5, atol=1e-5)


def _picked_mass(scores, idx):
  return jnp.where(idx >= 0, jnp.take_along_axis(scores, jnp.maximum(idx, 0), -1), 0.0).sum(-1)


class IndexerContract(parameterized.TestCase):
  """The Pallas path of `index_scores` / `index_topk` in GPU interpret mode against the reference; subclasses pick
  bf16 or FP8 and the key warpgroups."""

  fp8 = False
  two_key_warpgroups = False  # forced at small shapes (the automatic choice takes two from 64 x 128 columns)

  def inputs(self, *shape):
    return (dequantised_fp8_inputs if self.fp8 else make_inputs)(*shape)

  def run_pallas(self, fn):
    columns = 0 if self.two_key_warpgroups else kernel.TWO_KEY_WARPGROUPS_FROM_COLUMNS
    with (mock.patch.object(kernel, "TWO_KEY_WARPGROUPS_FROM_COLUMNS", columns), no_races(),
          plgpu.force_gpu_interpret_mode(INTERPRET)):
      return jax.jit(fn)()

  def scores(self, args, vis, implementation):
    if not self.fp8:
      return api.index_scores(*args, **vis, implementation=implementation)
    q, k, w = args
    q8, q_scale, k8, k_scale = api.quantize_fp8(q, k)
    return api.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis, implementation=implementation)

  @parameterized.named_parameters(
      ("segments", 1, 128, 256, 4, 200),  # a document boundary inside a tile; early tiles skipped
      ("ragged", 2, 100, 190, 4, 70),  # T, S not tile multiples: the API pads
      ("odd_heads", 1, 64, 192, 3, 0),  # one head per pipeline step
  )
  def test_scores_match_reference(self, B, T, S, I, boundary):  # noqa: N803
    args, vis = self.inputs(0, B, T, S, I, 128, boundary)
    got = self.run_pallas(lambda: self.scores(args, vis, "pallas"))
    chex.assert_shape(got, (B, T, S))
    _assert_scores_close(got, self.scores(args, vis, "xla"))

  def test_topk_matches_reference(self):
    """Row blocks of 64 queries, k larger than the early rows' visible counts, the default (pruned) select."""
    args, vis = self.inputs(7, 1, 128, 128, 2, 128, 40)
    got = self.run_pallas(lambda: api.index_topk(*args, topk=48, **vis, implementation="pallas",
                                                 rows_per_block=64, fp8=self.fp8))
    scores = self.scores(args, vis, "xla")
    want = topk_reference.topk_indices(scores, 48)
    # Products summed in another order can swap near-equal neighbours at the k-th place: compare the selected
    # score mass where the exact sets differ.
    chex.assert_trees_all_equal(got >= 0, want >= 0)
    np.testing.assert_allclose(_picked_mass(scores, got), _picked_mass(scores, want), rtol=1e-5)


class Bf16IndexerTest(IndexerContract):
  pass


class Bf16TwoKeyWarpgroupsTest(IndexerContract):
  two_key_warpgroups = True


class Fp8IndexerTest(IndexerContract):
  fp8 = True


class Fp8TwoKeyWarpgroupsTest(IndexerContract):
  fp8 = True
  two_key_warpgroups = True


class IndexTopkTest(parameterized.TestCase):

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
    args, _ = make_inputs(3, 1, 512, 512, 2, 128, 0)
    topk = lambda causal_prefix: api.index_topk(*args, topk=96, **vis, implementation="pallas", rows_per_block=64,
                                                select_implementation="xla", causal_prefix=causal_prefix)
    with no_races(), plgpu.force_gpu_interpret_mode(INTERPRET):
      full, auto, staged = (jax.jit(lambda c=c: topk(c))() for c in (False, None, True))
    chex.assert_trees_all_equal(auto, full)
    self.assertEqual(bool(jnp.array_equal(staged, full)), stageable)
    scores = reference.index_scores(*args, **vis)
    chex.assert_trees_all_equal(full >= 0, topk_reference.topk_indices(scores, 96) >= 0)

  def test_keys_precede_queries_checks(self):
    pos = jnp.arange(8)[None]
    seg = jnp.zeros_like(pos)
    check = lambda qp=pos, kp=pos, qs=seg, ks=seg: bool(api.keys_precede_queries(qp, kp, qs, ks))
    self.assertTrue(check())
    self.assertFalse(check(kp=pos.at[0, 5].set(2), qp=pos.at[0, 5].set(2)))  # a later key at an earlier position
    self.assertFalse(check(qp=pos[:, :4]))  # queries are not the keys' tokens
    self.assertFalse(check(qs=seg.at[0, 3].set(1)))

  def test_gradient_falls_back_to_reference(self):
    args, vis = make_inputs(4, 1, 64, 128, 2, 128, 0)
    f = lambda impl: lambda *a: jnp.where(jnp.isfinite(s := api.index_scores(*a, **vis, implementation=impl)),
                                          s, 0.0).sum()
    with no_races(), plgpu.force_gpu_interpret_mode(INTERPRET):
      got = jax.grad(f("pallas"), argnums=(0, 1, 2))(*args)
    chex.assert_trees_all_close(got, jax.grad(f("xla"), argnums=(0, 1, 2))(*args), rtol=1e-5, atol=1e-5)

  def test_requantising_dequantised_inputs_is_exact(self):
    """The model's fp8_numerics hands index_topk dequantised tensors; fp8=True must score them unchanged."""
    (q, k, w), vis = dequantised_fp8_inputs(5, 1, 64, 128, 4, 128, 0)
    exact = reference.index_scores(q, k, w, **vis)
    chex.assert_trees_all_equal(reference.index_scores_fp8(*api.quantize_fp8(q, k), w, **vis), exact)
    topk = lambda fp8: api.index_topk(q, k, w, topk=16, **vis, implementation="xla", fp8=fp8)
    chex.assert_trees_all_equal(topk(True), topk(False))

  def test_rejects_bad_key_warpgroups(self):
    args, vis = make_inputs(0, 1, 64, 128, 4, 128, 0)
    with self.assertRaisesRegex(ValueError, r"key_warpgroups=3 must be one of \(1, 2\)"):
      kernel.index_scores(*args, **vis, key_warpgroups=3)
    with self.assertRaisesRegex(ValueError, r"S=128 of 256 \(key_warpgroups=2\)"):
      kernel.index_scores(*args, **vis, key_warpgroups=2)


class LoweringTest(parameterized.TestCase):
  """index_topk at T = 128K, V3.2's 64 x 128 index heads, k = 2048, through the whole Mosaic GPU lowering."""

  @parameterized.named_parameters(("bf16", False, "bf16.bf16"), ("fp8", True, "e4m3.e4m3"))
  def test_index_topk_lowers_for_h200(self, fp8, wgmma_types):
    """Over all keys: one scores kernel of 4096 x 128K per row block (two key warpgroups of 128 keys each and a
    third that loads the query tiles, 2 heads per step), then the two selection kernels over its 4096 rows."""
    sd = jax.ShapeDtypeStruct
    T = 131072  # noqa: N806
    args = (sd((1, T, 64, 128), jnp.bfloat16), sd((1, T, 128), jnp.bfloat16), sd((1, T, 64), jnp.float32),
            *[sd((1, T), jnp.int32)] * 4)

    def f(q, k, w, q_pos, kv_pos, q_seg, kv_seg):
      return api.index_topk(q, k, w, topk=2048, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                            kv_segment_ids=kv_seg, implementation="pallas", fp8=fp8, causal_prefix=False)

    scores, *select = lower_for_h200(f, *args).launches
    self.assertEqual(scores.grid, (1, 4096 // kernel.BLOCK_T, T // (2 * kernel.BLOCK_S)))  # (b, t, s) reversed
    self.assertEqual(scores.block, (3 * 128, 1, 1))
    self.assertLessEqual(scores.smem_bytes, 227 * 1024)
    self.assertGreater(scores.count(f"wgmma.mma_async.sync.aligned.m64n128k{32 if fp8 else 16}.f32.{wgmma_types}"), 0)
    self.assertEqual(scores.count("wgmma.wait_group.sync.aligned 1"), 1)  # the second head's wgmma stays in flight
    self.assertEqual(scores.count("setmaxnreg.dec.sync.aligned.u32 40"), 1)  # the query-loading warpgroup
    self.assertEqual([launch.grid for launch in select], [(4096, 1, 1)] * 2)

  def test_causal_stages_lower_for_h200(self):
    """The default (causal_prefix checked on the data): both branches of the `lax.cond`, the key-prefix stages
    (one per 4096-row block) and all keys, each a scores kernel and the selections of its 4096 rows."""
    sd = jax.ShapeDtypeStruct
    T = 131072  # noqa: N806
    args = (sd((1, T, 64, 128), jnp.bfloat16), sd((1, T, 128), jnp.bfloat16), sd((1, T, 64), jnp.float32),
            *[sd((1, T), jnp.int32)] * 4)
    f = lambda q, k, w, *vis: api.index_topk(q, k, w, topk=2048, **dict(zip(
        ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids"), vis)), implementation="pallas")
    launches = lower_for_h200(f, *args).launches
    scores = [launch for launch in launches if launch.block == (384, 1, 1)]
    select = [launch for launch in launches if launch.block == (128, 1, 1)]
    # Key tiles of 256: the prefixes 4096 i (i = 1 .. 32) of the stages, then all keys.
    self.assertEqual(sorted(launch.grid[2] for launch in scores), [16 * i for i in range(1, 33)] + [512])
    # Two selections per scores kernel, but one for the first stage: its 4096 keys are fewer than 4 k.
    self.assertLen(select, 2 * len(scores) - 1)
    self.assertTrue(all(launch.grid == (4096, 1, 1) for launch in select))
    self.assertLen(launches, len(scores) + len(select))


del IndexerContract  # abstract: run through its subclasses only

if __name__ == "__main__":
  absltest.main()
