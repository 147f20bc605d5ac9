"""Indexer KL losses: one contract per loss (dense warm-up, sparse stage) against the materialising reference,
values and indexer gradients, run by the chunked XLA path and by the Mosaic GPU kernels in GPU interpret mode
(race detection on); the pieces each implementation has alone; and the kernels' lowering for an H200 at V3.2
shapes, T = 128K."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from pallas_kernels.indexer_kl import api, chunked, kernel_dense, kernel_dense_bwd, kernel_sparse, kernel_sparse_bwd
from pallas_kernels.indexer_kl import reference
from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.visibility import visible
from tests.pallas_kernels.mosaic_checks import INTERPRET, lower_for_h200, no_races

SCALE_V32 = 0.1352338


def _bf16(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def make_inputs(seed, B, T, S, N, C, I, H, boundary, first_query):  # noqa: N803
  """bf16-representable float32 inputs (the kernels compute in bf16) with the main attention's exact lse.

  Queries are positions first_query .. first_query + T - 1; batch row 1 starts a document at position `boundary`
  (a packed second document), so the query at that position sees only itself.
  """
  ks = jax.random.split(jax.random.key(seed), 5)
  q_positions = jnp.broadcast_to(jnp.arange(first_query, first_query + T), (B, T))
  kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  starts = jnp.array([[0], [boundary]])[:B]
  vis = dict(q_positions=q_positions, kv_positions=kv_positions,
             q_segment_ids=(q_positions >= starts).astype(jnp.int32),
             kv_segment_ids=(kv_positions >= starts).astype(jnp.int32))
  attn_q, attn_k = _bf16(jax.random.normal(ks[0], (B, T, N, C))), _bf16(jax.random.normal(ks[1], (B, S, C)))
  scale = C**-0.5
  logits = jnp.einsum("btnc,bsc->btns", attn_q, attn_k) * scale
  attn_lse = jax.nn.logsumexp(jnp.where(visible(**vis)[:, :, None, :], logits, -jnp.inf), axis=-1)
  idx = (_bf16(jax.random.normal(ks[2], (B, T, I, H))), _bf16(jax.random.normal(ks[3], (B, S, H))),
         jax.random.normal(ks[4], (B, T, I)) * (I * H) ** -0.5)
  return (attn_q, attn_k, attn_lse, scale), idx, vis


def sparse_indices(seed, B, T, S, K):  # noqa: N803
  """Distinct random indices per query [B, T, K] for queries at the last T positions: every query selects key
  S // 2, every 5th slot is -1, and the first query of row 0 selects nothing valid."""
  others = jnp.delete(jnp.arange(S), S // 2)
  keys = jax.random.split(jax.random.key(seed), B * T)
  perms = jax.vmap(lambda k: jax.random.permutation(k, others)[:K - 1])(keys)
  indices = jnp.concatenate([jnp.full((B * T, 1), S // 2), perms], axis=1).reshape(B, T, K)
  return jnp.where(jnp.arange(K) % 5 == 4, -1, indices).at[0, 0].set(-1).astype(jnp.int32)


def _assert_close_to_scale(got, want, rel):
  """max |got - want| <= rel * max |want| per leaf: the bf16 kernels round dL to bf16, which moves small
  entries by more than any elementwise rtol."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_less(np.abs(np.asarray(g, np.float32) - np.asarray(w)).max(),
                                 rel * np.abs(np.asarray(w)).max())


def _value_and_vjp(fn, attn, idx, extra, vis, g, **kw):
  kl, vjp = jax.vjp(lambda *a: fn(*attn, *a, *extra, **vis, **kw), *idx)
  return kl, vjp(g)


def _saved_statistics(attn, idx, vis):
  """The forward's residuals for the backward, from the XLA formulas: logsumexp(I) and z = sum p per token."""
  scores = indexer_reference.index_scores(*idx, **vis)
  logits = jnp.einsum("btnc,bsc->btns", attn[0], attn[1]) * attn[3]
  z = jnp.where(visible(**vis), jnp.exp(logits - attn[2][..., None]).sum(2), 0.0).sum(-1)
  return jax.nn.logsumexp(scores, axis=-1), z


class DenseKLContract(parameterized.TestCase):
  """`api.dense_kl` against `reference.dense_kl`; subclasses set the implementation and its tolerances."""

  kw = {}
  grad_rel = 1e-4  # max |got - want| / max |want| of each indexer gradient

  def run_dense(self, attn, idx, vis, g):
    return _value_and_vjp(api.dense_kl, attn, idx, (), vis, g, t_chunk=4, s_chunk=64, **self.kw)

  @parameterized.named_parameters(
      # 2 documents in row 1 (one query sees only itself, key tiles before its document skipped), ragged T
      # and S, index heads padded 8 -> 16.
      ("segments_ragged", 2, 7, 150, 16, 128, 8, 64, 146, 143),
      # V3.2 widths (576-dim latent key, 128-dim index key) with few heads; later key tiles skipped causally.
      ("v32_widths", 1, 3, 200, 16, 576, 16, 128, 0, 117),
  )
  def test_matches_reference(self, B, T, S, N, C, I, H, boundary, first_query):  # noqa: N803
    attn, idx, vis = make_inputs(T + S, B, T, S, N, C, I, H, boundary, first_query)
    g = jax.random.normal(jax.random.key(1), (B, T))
    got, got_grads = self.run_dense(attn, idx, vis, g)
    want, want_grads = _value_and_vjp(reference.dense_kl, attn, idx, (), vis, g)
    chex.assert_shape(got, (B, T))
    chex.assert_trees_all_equal_shapes_and_dtypes(got_grads, idx)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    _assert_close_to_scale(got_grads, want_grads, self.grad_rel)
    if boundary:  # the query at the document start sees one key: both distributions are one-hot
      np.testing.assert_allclose(got[1, boundary - first_query], 0.0, atol=1e-6)


class ChunkedDenseKLTest(DenseKLContract):
  kw = dict(implementation="xla")

  def test_backward_matches_reference_vjp(self):
    """`chunked.dense_kl_grads` alone (the deterministic backward; its early query chunks skip key chunks)."""
    attn, idx, vis = make_inputs(2, 2, 24, 40, 4, 16, 3, 8, 30, 16)
    lse_scores, z = _saved_statistics(attn, idx, vis)
    g = jax.random.normal(jax.random.key(3), (2, 24))
    got = chunked.dense_kl_grads(*attn, *idx, lse_scores, z, g, **vis, t_chunk=5, s_chunk=16)
    _, vjp = jax.vjp(lambda *a: reference.dense_kl(*attn, *a, **vis), *idx)
    chex.assert_trees_all_close(got, vjp(g), rtol=1e-4, atol=1e-5)

  def test_attention_side_gets_no_gradient(self):
    attn, idx, vis = make_inputs(4, 2, 24, 40, 4, 16, 3, 8, 30, 16)
    grads = jax.grad(lambda q, k, lse: api.dense_kl(q, k, lse, attn[3], *idx, **vis).sum(),
                     argnums=(0, 1, 2))(*attn[:3])
    chex.assert_trees_all_close(grads, jax.tree.map(jnp.zeros_like, grads))


class PallasDenseKLTest(DenseKLContract):
  """Forward and backward kernels; the backward rounds dL to bf16."""
  kw = dict(implementation="pallas", interpret=True)
  grad_rel = 1e-2

  def run_dense(self, attn, idx, vis, g):
    with no_races(min_kernels=2):
      return super().run_dense(attn, idx, vis, g)

  def test_backward_kernel_without_keys(self):
    """V3.2 index widths (64 heads x 128, two column slabs) at a 192-dim latent key against the XLA backward; the
    last query of row 1 belongs to no key's document (z = 0: no gradient)."""
    attn, idx, vis = make_inputs(5, 2, 5, 70, 16, 192, 64, 128, 66, 62)
    vis = dict(vis, q_segment_ids=vis["q_segment_ids"].at[1, -1].set(7))
    lse_scores, z = _saved_statistics(attn, idx, vis)
    g = jax.random.normal(jax.random.key(6), (2, 5))
    with no_races():
      got = kernel_dense_bwd.dense_grads(*attn, *idx, lse_scores, z, g, **vis, interpret=INTERPRET)
    want = chunked.dense_kl_grads(*attn, *idx, lse_scores, z, g, **vis, t_chunk=4, s_chunk=32)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    _assert_close_to_scale(got[:2], want[:2], 1e-2)  # d idx_q, d idx_k: through bf16 dL
    chex.assert_trees_all_close(got[2], want[2], rtol=1e-4, atol=1e-5)  # d idx_w: float32 from L and dI
    np.testing.assert_array_equal(got[0][1, -1], 0.0)
    np.testing.assert_array_equal(got[2][1, -1], 0.0)

  def test_supports(self):
    self.assertTrue(kernel_dense.supports(128, 576, 64, 128))  # V3.2: 7 ring slots beside 160 KiB of queries
    self.assertEqual(kernel_dense.stages_for(*kernel_dense.padded_dims(128, 576, 64, 128)), 7)
    self.assertTrue(kernel_dense.supports(16, 320, 16, 64))
    self.assertFalse(kernel_dense.supports(512, 576, 64, 128))  # more heads than one wgmma N
    self.assertFalse(kernel_dense.supports(192, 576, 64, 128))  # queries leave no room for the ring
    self.assertEqual(kernel_dense_bwd.stages_for(128, 576, 128), 4)  # V3.2: 4 ring slots beside 190 KiB
    self.assertTrue(kernel_dense_bwd.supports(128, 576, 64, 128))
    self.assertFalse(kernel_dense_bwd.supports(128, 576, 128, 128))  # index heads beyond one wgmma M
    self.assertFalse(kernel_dense_bwd.supports(160, 576, 64, 128))  # queries leave no room for the ring


class PallasDeterministicDenseKLTest(DenseKLContract):
  """The forward kernel with the chunked XLA backward (`deterministic=True`): float32 gradients."""
  kw = dict(implementation="pallas", interpret=True, deterministic=True)

  def run_dense(self, attn, idx, vis, g):
    with no_races():
      return super().run_dense(attn, idx, vis, g)


class SparseKLContract(parameterized.TestCase):
  """`api.sparse_kl` against `reference.sparse_kl`; subclasses set the implementation and its tolerances."""

  kw = {}
  grad_rel = 1e-4

  def run_sparse(self, attn, idx, indices, vis, g):
    return _value_and_vjp(api.sparse_kl, attn, idx, (indices,), vis, g, t_chunk=3, **self.kw)

  @parameterized.named_parameters(
      # ragged K (two 64-key blocks, the second partly padding), index heads padded 8 -> 64; row 1 starts a
      # document at key S - 2, so its last query sees keys S - 2 and S - 1 only (its other selections masked)
      ("ragged_k", 2, 2, 160, 16, 64, 8, 64, 70),
      # V3.2 key widths (576-dim latent key, 128-dim index key) with few heads; one block
      ("v32_widths", 1, 2, 96, 16, 576, 16, 128, 40),
  )
  def test_matches_reference(self, B, T, S, N, C, I, H, K):  # noqa: N803
    attn, idx, vis = make_inputs(S + K, B, T, S, N, C, I, H, S - 2, S - T)
    indices = sparse_indices(K, B, T, S, K)
    g = jax.random.normal(jax.random.key(2), (B, T))
    got, got_grads = self.run_sparse(attn, idx, indices, vis, g)
    want, want_grads = _value_and_vjp(reference.sparse_kl, attn, idx, (indices,), vis, g)
    chex.assert_shape(got, (B, T))
    chex.assert_trees_all_equal_shapes_and_dtypes(got_grads, idx)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0, 0], 0.0)  # no valid key
    _assert_close_to_scale(got_grads, want_grads, self.grad_rel)


class ChunkedSparseKLTest(SparseKLContract):
  kw = dict(implementation="xla")

  def test_key_gradient_accumulates_in_float32(self):
    """bf16 indexer inputs, 2048 queries all selecting the same 8 keys: d idx_k sums 2048 terms per key.
    It must be as close to the float32 computation as one bf16 rounding of the inputs allows; summed in
    bf16 (the scatter-add of a bf16 gather's backward) it was ~10x further off."""
    t, s, k, n, c, i, h = 2048, 8, 8, 4, 16, 3, 8
    ks = jax.random.split(jax.random.key(7), 5)
    vis = dict(q_positions=jnp.full((1, t), s, jnp.int32), kv_positions=jnp.arange(s)[None],
               q_segment_ids=jnp.zeros((1, t), jnp.int32), kv_segment_ids=jnp.zeros((1, s), jnp.int32))
    attn_q, attn_k = jax.random.normal(ks[0], (1, t, n, c)), jax.random.normal(ks[1], (1, s, c))
    attn_lse = jax.nn.logsumexp(jnp.einsum("btnc,bsc->btns", attn_q, attn_k) * c**-0.5, axis=-1)
    idx = (jax.random.normal(ks[2], (1, t, i, h)), jax.random.normal(ks[3], (1, s, h)),
           jax.random.normal(ks[4], (1, t, i)))
    indices = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (1, t, k))
    d_key = lambda idx_k, idx_q: jax.grad(lambda kk: api.sparse_kl(
        attn_q, attn_k, attn_lse, c**-0.5, idx_q, kk, idx[2], indices, **vis, t_chunk=16,
        implementation="xla").sum())(idx_k)
    want = d_key(_bf16(idx[1]), _bf16(idx[0]))
    got = d_key(idx[1].astype(jnp.bfloat16), idx[0].astype(jnp.bfloat16)).astype(jnp.float32)
    self.assertLess(float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))), 8e-3)


class PallasSparseKLTest(SparseKLContract):
  """Forward and backward kernels (the TMA row gather stands in for cp.async in interpret mode); bf16 operands of
  the backward's wgmmas."""
  kw = dict(implementation="pallas", interpret=True)
  grad_rel = 1e-2

  def run_sparse(self, attn, idx, indices, vis, g):
    with no_races(min_kernels=2):
      return super().run_sparse(attn, idx, indices, vis, g)

  def test_selected_keys_fold_visibility(self):
    """Slots that are -1, later than their query or in another document become -1; K is padded to 64."""
    _, _, vis = make_inputs(0, 2, 2, 160, 16, 64, 8, 64, 158, 158)
    selected = kernel_sparse.selected_keys(sparse_indices(70, 2, 2, 160, 70), **vis)
    chex.assert_shape(selected, (2, 2, 128))
    self.assertEqual(int((selected[0, 0] >= 0).sum()), 0)  # row 0's first query: nothing valid
    self.assertLessEqual(int((selected[1, -1] >= 0).sum()), 2)  # row 1's last query: keys 158, 159 at most
    self.assertTrue(bool(jnp.all(selected[..., 70:] == -1)))

  def test_supports(self):
    self.assertTrue(kernel_sparse.supports(128, 576, 64, 128))
    self.assertEqual(kernel_sparse.forward_stages(*kernel_sparse.padded_dims(128, 576, 64, 128)), 7)
    self.assertEqual(kernel_sparse_bwd.stages_for(*kernel_sparse.padded_dims(128, 576, 64, 128)), 3)
    self.assertTrue(kernel_sparse_bwd.supports(128, 576, 64, 128))
    self.assertTrue(kernel_sparse.supports(16, 320, 16, 64) and kernel_sparse_bwd.supports(16, 320, 16, 64))
    self.assertFalse(kernel_sparse.supports(128, 576, 128, 128))  # index heads beyond one wgmma M
    self.assertFalse(kernel_sparse_bwd.supports(160, 576, 64, 128))  # queries leave no room for the ring

  def test_automatic_choice_needs_bf16_fitting_sizes_and_few_keys(self):
    q = jnp.zeros((1, 4, 128, 576), jnp.bfloat16)
    iq = jnp.zeros((1, 4, 64, 128), jnp.bfloat16)
    self.assertTrue(api._sparse_kernel_supports(q, iq, 8192))
    self.assertTrue(api._sparse_kernel_supports(q, iq, api.SPARSE_KERNEL_MAX_KEYS))
    self.assertFalse(api._sparse_kernel_supports(q, iq, 32768))
    self.assertFalse(api._sparse_kernel_supports(q.astype(jnp.float32), iq.astype(jnp.float32), 8192))
    self.assertFalse(api._sparse_kernel_supports(jnp.zeros((1, 4, 160, 576), jnp.bfloat16), iq, 8192))

  def test_publish_lag_never_exceeds_a_block(self):
    """The cp.async gather's publish lag (a longer one deadlocked on the H200 at the parity model's shapes)."""
    self.assertEqual(kernel_sparse.publish_lag(12, 6), 6)  # parity `small`: 5 latent + 1 index chunks
    self.assertEqual(kernel_sparse.publish_lag(7, 11), 5)  # V3.2 forward
    self.assertEqual(kernel_sparse.publish_lag(3, 11), 1)  # V3.2 backward
    self.assertEqual(kernel_sparse.publish_lag(2, 11), 0)


class LoweringTest(parameterized.TestCase):
  """V3.2 shapes at T = S = 128K (K = 2048) through the whole Mosaic GPU lowering: the gradient of each loss runs
  its forward and backward kernel. Interpret mode cannot run the cp.async gather nor the TMA reduce-adds: only
  this compiles them."""

  def _launches(self, sparse: bool):
    sd = jax.ShapeDtypeStruct
    T = 131072  # noqa: N806  (the grid's token axis above CUDA's 65535 limit for y and z)
    args = (sd((1, T, 128, 576), jnp.bfloat16), sd((1, T, 576), jnp.bfloat16), sd((1, T, 128), jnp.float32),
            sd((1, T, 64, 128), jnp.bfloat16), sd((1, T, 128), jnp.bfloat16), sd((1, T, 64), jnp.float32),
            *([sd((1, T, 2048), jnp.int32)] if sparse else []), *[sd((1, T), jnp.int32)] * 4)
    names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")

    def loss(q, k, lse, iq, ik, w, *rest):
      kl = api.sparse_kl if sparse else api.dense_kl
      return kl(q, k, lse, SCALE_V32, iq, ik, w, *rest[:-4], **dict(zip(names, rest[-4:])),
                implementation="pallas").sum()

    return lower_for_h200(jax.grad(loss, argnums=(3, 4, 5)), *args).launches

  @parameterized.named_parameters(("dense", False), ("sparse", True))
  def test_forward_and_backward_kernels(self, sparse):
    """One token per CTA (tokens on CUDA x), a compute and a memory warpgroup, the token's 144 KiB query and the key
    ring filling SMEM; the backward adds d idx_k with TMA reduce-adds; the sparse kernels gather with cp.async."""
    forward, backward = self._launches(sparse)
    for launch in (forward, backward):
      self.assertEqual((launch.grid, launch.block), ((131072, 1, 1), (256, 1, 1)))
      self.assertBetween(launch.smem_bytes, 200 * 1024, 232448)
      self.assertEqual(launch.count("setmaxnreg.dec.sync.aligned.u32 40"), 1)
      self.assertEqual(launch.count("nvvm.cp.async.shared.global") > 0, sparse)
    self.assertEqual(forward.count("cp.reduce.async.bulk"), 0)
    self.assertGreater(backward.count("cp.reduce.async.bulk"), 0)


del DenseKLContract, SparseKLContract  # abstract: run through their subclasses only

if __name__ == "__main__":
  absltest.main()
