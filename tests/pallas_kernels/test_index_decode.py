"""Indexer decode (`pallas_kernels.index_decode`): the reference against the lightning indexer's on unpaged keys,
the Mosaic GPU path in GPU interpret mode against the reference (FP8 and bf16 keys, shuffled pages, fewer than k
visible keys, ties), the errors, and the lowering for an H200 at V3.2 shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.index_decode import api, kernel, reference
from pallas_kernels.lightning_indexer import reference as indexer_reference
from tests.pallas_kernels.mosaic_checks import INTERPRET, SMEM_PER_BLOCK, lower_for_h200, no_races


def paged_inputs(seed, lengths, *, heads=4, dim=128, page_size=64, fp8=True, rows_per_seq=1, integer=True):
  """Decode inputs for sequences of these lengths (the last rows_per_seq rows of each see lengths - r, ... ,
  lengths), their pages in shuffled order in a pool with spare pages. integer: q, k in {-2..2}, scales in
  {1/2, 1, 2} and weights in {1, 2} / 64, so that every score is exact in float32 whatever the order of the sums
  (and many tie); else normal values. -> dict of `api.index_decode_topk`'s arguments."""
  ks = jax.random.split(jax.random.key(seed), 7)
  rng = np.random.default_rng(seed)
  max_pages = max(1, -(-max(lengths) // page_size))
  num_pages = len(lengths) * max_pages + 3
  perm = rng.permutation(num_pages)
  tables = [perm[i * max_pages:(i + 1) * max_pages] for i in range(len(lengths))]
  block_table = jnp.asarray(np.repeat(np.stack(tables), rows_per_seq, axis=0), jnp.int32)
  row_lengths = jnp.asarray([max(n - r, 0) for n in lengths for r in reversed(range(rows_per_seq))], jnp.int32)
  num_rows, num_keys = len(row_lengths), num_pages * page_size
  dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  if integer:
    q = jax.random.randint(ks[0], (num_rows, heads, dim), -2, 3)
    k = jax.random.randint(ks[1], (num_keys, dim), -2, 3)
    weights = jax.random.randint(ks[2], (num_rows, heads), 1, 3) / 64
    scale = lambda key, shape: jnp.exp2(jax.random.randint(key, shape, -1, 2).astype(jnp.float32))
  else:
    q = jax.random.normal(ks[0], (num_rows, heads, dim)) * 4
    k = jax.random.normal(ks[1], (num_keys, dim)) * 4
    weights = jax.random.normal(ks[2], (num_rows, heads)) * (heads * dim) ** -0.5
    scale = lambda key, shape: jax.random.uniform(key, shape, minval=0.01, maxval=0.1)
  return dict(q=q.astype(dtype), q_scale=scale(ks[3], (num_rows, heads)) if fp8 else None,
              weights=weights.astype(jnp.float32), idx_k=k.astype(dtype),
              idx_scale=scale(ks[4], (num_keys,)) if fp8 else None, block_table=block_table, lengths=row_lengths)


def unpaged_scores(args, page_size):
  """The lightning indexer's reference on each row's keys gathered in logical order (the paging undone by hand)."""
  out = []
  for r in range(args["q"].shape[0]):
    rows = (args["block_table"][r][:, None] * page_size + np.arange(page_size)).reshape(-1)
    k = args["idx_k"][rows].astype(jnp.float32)
    k_scale = (jnp.ones(rows.shape) if args["idx_scale"] is None else args["idx_scale"][rows])[None]
    q_scale = jnp.ones(args["weights"].shape[1]) if args["q_scale"] is None else args["q_scale"][r]
    positions = jnp.arange(len(rows))[None]
    scores = indexer_reference.index_scores_fp8(
        args["q"][r][None, None].astype(jnp.float32), q_scale[None, None], k[None], k_scale,
        args["weights"][r][None, None], q_positions=args["lengths"][r][None, None] - 1, kv_positions=positions,
        q_segment_ids=jnp.zeros((1, 1), jnp.int32), kv_segment_ids=jnp.zeros_like(positions))
    out.append(scores[0, 0])
  return jnp.stack(out)


def run_pallas(args, k, page_size):
  with no_races(), plgpu.force_gpu_interpret_mode(INTERPRET):
    return jax.jit(lambda a: api.index_decode_topk(**a, k=k, page_size=page_size, implementation="pallas"))(args)


class ReferenceTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_scores_match_the_indexer_on_unpaged_keys(self, fp8):
    args = paged_inputs(0, (150, 64, 1), fp8=fp8, rows_per_seq=2, integer=False)
    got = reference.index_decode_scores(**args, page_size=64)
    # Two float32 summation orders of the same 128-term dot products and head sum: a score that cancels to near 0
    # keeps an absolute error of order 128 x 2^-24 x its terms' magnitude (~1e-5 here), not a relative one.
    chex.assert_trees_all_close(got, unpaged_scores(args, 64), rtol=1e-5, atol=1e-5)

  def test_ties_go_to_the_lower_position(self):
    """Equal keys everywhere: every visible score ties, so the k lowest positions are chosen."""
    args = paged_inputs(1, (300,), page_size=16)
    args["idx_k"] = jnp.ones_like(args["idx_k"])
    args["idx_scale"] = jnp.ones_like(args["idx_scale"])
    indices, scores = api.index_decode_topk(**args, k=40, page_size=16, implementation="xla")
    np.testing.assert_array_equal(indices[0], np.arange(40))
    self.assertEqual(len(np.unique(scores)), 1)


class Fp8PallasTest(parameterized.TestCase):
  """The "pallas" path in GPU interpret mode equals the reference exactly on integer inputs (FP8 keys and q;
  `Bf16PallasTest`: bf16)."""

  fp8 = True

  @parameterized.named_parameters(
      # sequences' lengths, rows per sequence, page size, k
      ("pages_of_64_mtp", (150, 40), 2, 64, 64),  # a partial last page; the second sequence sees fewer than k
      ("pages_of_32", (100, 9, 0), 1, 32, 32),  # 2 pages per tile; an empty row (all -1)
  )
  def test_equals_reference(self, lengths, rows_per_seq, page_size, k):
    self.check_equals_reference(lengths, rows_per_seq, page_size, k)

  def check_equals_reference(self, lengths, rows_per_seq, page_size, k):
    args = paged_inputs(2, lengths, page_size=page_size, fp8=self.fp8, rows_per_seq=rows_per_seq)
    got_indices, got_scores = run_pallas(args, k, page_size)
    want_indices, want_scores = reference.index_decode_topk(**args, k=k, page_size=page_size)
    chex.assert_shape((got_indices, got_scores), (len(args["lengths"]), k))
    np.testing.assert_array_equal(got_indices, want_indices)
    np.testing.assert_array_equal(got_scores, want_scores)
    np.testing.assert_array_equal((got_indices >= 0).sum(1), np.minimum(args["lengths"], k))

  def test_scores_match_reference_within_rounding(self):
    """Normal inputs, several key tiles per CTA (splits forced to 2): the scores up to float32 rounding."""
    args = paged_inputs(3, (520,), fp8=self.fp8, integer=False)
    pages = reference.visible_pages(args["block_table"], args["lengths"], 64, args["idx_k"].shape[0] // 64)
    w = args["weights"] * (1.0 if args["q_scale"] is None else args["q_scale"])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, kernel.HEAD_ALIGN - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    with no_races(), plgpu.force_gpu_interpret_mode(INTERPRET):
      got = kernel.index_decode_scores(pad(args["q"]), pad(w), args["idx_k"], args["idx_scale"],
                                       kernel.tile_rows(pages, 64, args["idx_scale"] is not None), args["lengths"],
                                       page_size=64, splits=2)
    want = reference.index_decode_scores(**args, page_size=64)
    chex.assert_trees_all_close(got[:, :520], want[:, :520], rtol=1e-5, atol=1e-5)


class Bf16PallasTest(Fp8PallasTest):
  fp8 = False

  def test_pages_of_16(self):
    """Without key scales the kernel takes pages of 8 keys and more (4 pages per tile here)."""
    self.check_equals_reference((100, 9, 0), 1, 16, 32)


class ErrorsTest(absltest.TestCase):

  def test_mixed_dtypes_are_refused_by_the_kernel(self):
    args = paged_inputs(4, (64,))
    args["q"] = args["q"].astype(jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "both bfloat16 or both float8_e4m3fn"):
      api.index_decode_topk(**args, k=8, page_size=64, implementation="pallas")
    self.assertEqual(api.index_decode_topk(**args, k=8, page_size=64, implementation="xla")[0].shape, (1, 8))

  def test_fp8_pages_under_32_keys_are_refused_by_the_kernel(self):
    """A TMA copy of a page's float32 key scales must fill whole 128-byte units of shared memory."""
    args = paged_inputs(4, (64,), page_size=16)
    with self.assertRaisesRegex(ValueError, r"page_size=16; allowed: .*a multiple of 8 \(of 32 with key scales\)"):
      api.index_decode_topk(**args, k=8, page_size=16, implementation="pallas")
    self.assertFalse(api._kernel_supports(args["q"], args["idx_k"], args["idx_scale"], 16))
    self.assertTrue(api._kernel_supports(args["q"], args["idx_k"], None, 16))
    self.assertTrue(api._kernel_supports(args["q"], args["idx_k"], args["idx_scale"], 32))

  def test_shapes_are_checked(self):
    args = paged_inputs(4, (64,))
    args["weights"] = args["weights"][:, :2]
    with self.assertRaisesRegex(ValueError, r"weights has shape \(1, 2\); allowed: \(1, 4\)"):
      api.index_decode_topk(**args, k=8, page_size=64, implementation="xla")

  def test_fp8_q_needs_its_scale(self):
    args = dict(paged_inputs(4, (64,)), q_scale=None)
    with self.assertRaisesRegex(ValueError, "without q_scale"):
      api.index_decode_topk(**args, k=8, page_size=64, implementation="xla")


class LoweringTest(parameterized.TestCase):
  """The whole "pallas" path lowered for an H200 at V3.2 shapes: 64 x 128 index heads, k = 2048, 128K keys."""

  @parameterized.parameters((128, True), (1, True), (32, False))
  def test_v32_shapes(self, num_rows, fp8):
    S, page_size = 131072, 64  # noqa: N806
    dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    sd = jax.ShapeDtypeStruct
    pool = num_rows * S
    args = (sd((num_rows, 64, 128), dtype), sd((num_rows, 64), jnp.float32) if fp8 else None,
            sd((num_rows, 64), jnp.float32), sd((pool, 128), dtype), sd((pool,), jnp.float32) if fp8 else None,
            sd((num_rows, S // page_size), jnp.int32), sd((num_rows,), jnp.int32))
    lowered = lower_for_h200(lambda *a: api.index_decode_topk(*a, k=2048, page_size=page_size,
                                                              implementation="pallas"), *args)
    scores = lowered.launches[0]
    splits = kernel.default_splits(num_rows, S // kernel.TILE, kernel.smem_bytes(64, 128, dtype, fp8))
    self.assertEqual(scores.grid, (splits, num_rows, 1))  # Mosaic GPU launches the grid reversed
    self.assertEqual(scores.block, (128, 1, 1))
    self.assertBetween(scores.smem_bytes, kernel.smem_bytes(64, 128, dtype, fp8), SMEM_PER_BLOCK // (4 if fp8 else 2))
    self.assertEqual(splits, min(S // kernel.TILE, kernel.SMS * (4 if fp8 else 2) // num_rows))  # CTAs per SM
    wgmma = f"wgmma.mma_async.sync.aligned.m64n64k{32 if fp8 else 16}.f32.{'e4m3.e4m3' if fp8 else 'bf16.bf16'}"
    self.assertGreater(scores.count(wgmma), 0)
    self.assertLen(lowered.launches, 3)  # the scores, then the pruned select's two selections


if __name__ == "__main__":
  absltest.main()
