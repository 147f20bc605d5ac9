"""The row-blocked XLA top-k of the lightning indexer (`chunked.py`) against the unblocked reference: bitwise
the same indices for blocks that do not divide T, packed documents, rows with fewer than k visible keys and many
tied scores, in bf16 and FP8, called directly and through `api.index_topk(implementation="xla")`."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

from pallas_kernels.lightning_indexer import api, chunked, reference
from pallas_kernels.topk import reference as topk_reference


def _inputs(seed, B, T, I, H, dtype=jnp.bfloat16):  # noqa: N803
  """Self-attention over packed documents of random lengths (the first ones shorter than k). q and k take a few
  small integer values, so many scores tie and the lower key index must win."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.randint(ks[0], (B, T, I, H), -2, 3).astype(dtype)
  k = jax.random.randint(ks[1], (B, T, H), -2, 3).astype(dtype)
  w = jax.random.randint(ks[2], (B, T, I), 1, 3).astype(jnp.float32) * I**-0.5 * H**-0.5
  starts = jax.random.bernoulli(ks[3], 0.1, (B, T)).at[:, 0].set(True).at[:, 3].set(True)
  segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
  first = jax.vmap(lambda seg: jnp.searchsorted(seg, seg))(segment_ids)
  positions = (jnp.arange(T) - first).astype(jnp.int32)
  vis = dict(q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  return (q, k, w), vis


def _unblocked(q, k, w, topk, **vis):
  return topk_reference.topk_indices(reference.index_scores(q, k, w, **vis), topk)


class ChunkedIndexTopkTest(parameterized.TestCase):

  @parameterized.named_parameters(("one_row", 1), ("ragged", 7), ("divides", 16), ("longer_than_t", 100))
  def test_matches_unblocked_reference(self, rows_per_block):
    (q, k, w), vis = _inputs(0, 2, 48, 4, 16)
    got = jax.jit(lambda q, k, w: chunked.index_topk(lambda q, w, k, **v: reference.index_scores(q, k, w, **v),
                                                     (q, w), (k,), topk=8, **vis, rows_per_block=rows_per_block))(
        q, k, w)
    want = _unblocked(q, k, w, 8, **vis)
    chex.assert_shape(got, (2, 48, 8))
    chex.assert_trees_all_equal(got, want)
    self.assertGreater(int(jnp.sum(want == -1)), 0)  # some rows see fewer than k keys

  @parameterized.named_parameters(("bf16", False), ("fp8", True))
  def test_api_xla_path_matches_unblocked_reference(self, fp8):
    """BLOCK_BYTES shrunk so that the default block is 3 rows (logits of 4 heads over 48 keys)."""
    (q, k, w), vis = _inputs(1, 2, 48, 4, 16, jnp.float32)
    with mock.patch.object(chunked, "BLOCK_BYTES", 3 * 2 * 4 * 2 * 4 * 48):
      self.assertEqual(chunked.default_rows_per_block(2, 4, 48), 3)
      got = api.index_topk(q, k, w, topk=8, **vis, implementation="xla", fp8=fp8)
    if fp8:
      q8, q_scale, k8, k_scale = api.quantize_fp8(q, k)
      want = topk_reference.topk_indices(reference.index_scores_fp8(q8, q_scale, k8, k_scale, w, **vis), 8)
    else:
      want = _unblocked(q, k, w, 8, **vis)
    chex.assert_trees_all_equal(got, want)

  def test_default_block_bounds_the_logits(self):
    self.assertEqual(chunked.default_rows_per_block(1, 16, 32768), chunked.BLOCK_BYTES // (8 * 16 * 32768))
    self.assertEqual(chunked.default_rows_per_block(8, 64, 2**20), 1)  # never zero rows


if __name__ == "__main__":
  absltest.main()
