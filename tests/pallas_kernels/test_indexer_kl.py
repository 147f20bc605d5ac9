"""Indexer KL losses against the materialising reference: values and indexer gradients of the chunked XLA
path and of the Mosaic GPU kernels (interpret mode), and lowering of the kernels for an H200 at V3.2 shapes."""

import re
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.indexer_kl import api, dense_bwd, kernel_dense, kernel_dense_bwd, reference
from pallas_kernels.lightning_indexer import reference as indexer_reference
from pallas_kernels.topk import reference as topk_reference
from pallas_kernels.visibility import visible

B, T, S, N, C, I, H = 2, 24, 40, 4, 16, 3, 8  # noqa: E741
H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))


def _inputs(seed: int):
  ks = jax.random.split(jax.random.key(seed), 6)
  q_positions = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  boundary = jnp.array([[0], [S - 10]])  # batch 1 packs two documents, the second starting at key S - 10
  q_segment_ids = (q_positions >= boundary).astype(jnp.int32)
  kv_segment_ids = (kv_positions >= boundary).astype(jnp.int32)
  vis = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
             kv_segment_ids=kv_segment_ids)
  attn_q = jax.random.normal(ks[0], (B, T, N, C))
  attn_k = jax.random.normal(ks[1], (B, S, C))
  scale = C**-0.5
  logits = jnp.einsum("btnc,bsc->btns", attn_q, attn_k) * scale
  mask = visible(**vis)[:, :, None, :]
  attn_lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
  idx = (jax.random.normal(ks[2], (B, T, I, H)), jax.random.normal(ks[3], (B, S, H)),
         jax.random.normal(ks[4], (B, T, I)))
  return (attn_q, attn_k, attn_lse, scale), idx, vis


class IndexerKLTest(parameterized.TestCase):

  def test_dense_matches_reference(self):
    attn, idx, vis = _inputs(time.time_ns())

    def loss(fn, *idx_args, **kw):
      return fn(*attn, *idx_args, **vis, **kw).sum()

    got, got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(api.dense_kl, *idx, t_chunk=8, s_chunk=16)
    want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(reference.dense_kl, *idx)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)
    chex.assert_shape(api.dense_kl(*attn, *idx, **vis), (B, T))
    self.assertGreater(float(want), 0.0)

  def test_sparse_matches_reference(self):
    attn, idx, vis = _inputs(time.time_ns())
    scores = indexer_reference.index_scores(*idx, **vis)
    indices = topk_reference.topk_indices(scores, 16)  # early rows have < 16 keys: -1 slots

    def loss(fn, *idx_args, **kw):
      return fn(*attn, *idx_args, indices, **vis, **kw).sum()

    got, got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(api.sparse_kl, *idx, t_chunk=5)
    want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(reference.sparse_kl, *idx)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)

  def test_sparse_key_gradient_accumulates_in_float32(self):
    """bf16 indexer inputs, 2048 queries all selecting the same 8 keys: d idx_k sums 2048 terms per key.
    It must be as close to the float32 computation as one bf16 rounding of the inputs allows; summed in
    bf16 (the scatter-add of a bf16 gather's backward) it was ~10x further off."""
    t, s, k = 2048, 8, 8
    ks = jax.random.split(jax.random.key(time.time_ns()), 5)
    vis = dict(q_positions=jnp.full((1, t), s, jnp.int32), kv_positions=jnp.arange(s)[None],
               q_segment_ids=jnp.zeros((1, t), jnp.int32), kv_segment_ids=jnp.zeros((1, s), jnp.int32))
    attn_q, attn_k = jax.random.normal(ks[0], (1, t, N, C)), jax.random.normal(ks[1], (1, s, C))
    attn_lse = jax.nn.logsumexp(jnp.einsum("btnc,bsc->btns", attn_q, attn_k) * C**-0.5, axis=-1)
    idx = (jax.random.normal(ks[2], (1, t, I, H)), jax.random.normal(ks[3], (1, s, H)),
           jax.random.normal(ks[4], (1, t, I)))
    indices = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (1, t, k))
    d_key = lambda idx_k, idx_q: jax.grad(lambda kk: api.sparse_kl(
        attn_q, attn_k, attn_lse, C**-0.5, idx_q, kk, idx[2], indices, **vis, t_chunk=16).sum())(idx_k)
    want = d_key(idx[1].astype(jnp.bfloat16).astype(jnp.float32), idx[0].astype(jnp.bfloat16).astype(jnp.float32))
    got = d_key(idx[1].astype(jnp.bfloat16), idx[0].astype(jnp.bfloat16)).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    self.assertLess(err, 8e-3)

  def test_attention_side_gets_no_gradient(self):
    attn, idx, vis = _inputs(time.time_ns())
    grads = jax.grad(lambda q, k, lse: api.dense_kl(q, k, lse, attn[3], *idx, **vis).sum(),
                     argnums=(0, 1, 2))(*attn[:3])
    chex.assert_trees_all_close(grads, jax.tree.map(jnp.zeros_like, grads))

  def test_kl_is_zero_when_indexer_matches_target(self):
    """With a single visible key per query both distributions are one-hot: KL = 0 (hand-computed)."""
    attn, idx, vis = _inputs(time.time_ns())
    vis = dict(vis, kv_segment_ids=jnp.broadcast_to(jnp.arange(S), (B, S)),
               q_segment_ids=vis["q_positions"])  # each query sees only the key at its own position
    lse = jnp.einsum("btnc,btc->btn", attn[0], jnp.take_along_axis(attn[1], vis["q_positions"][..., None], 1)) * attn[3]
    kl = api.dense_kl(attn[0], attn[1], lse, attn[3], *idx, **vis, t_chunk=8, s_chunk=16)
    np.testing.assert_allclose(kl, np.zeros((B, T)), atol=1e-5)


def _kernel_inputs(seed, B, T, S, N, C, I, H, boundary, first_query):  # noqa: N803
  """bf16-representable float32 inputs (the kernel computes in bf16) with the main attention's exact lse.

  Queries are positions first_query .. first_query + T - 1; batch row 1 starts a document at position
  `boundary`, so the query at that position sees only itself.
  """
  ks = jax.random.split(jax.random.key(seed), 5)
  bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  q_positions = jnp.broadcast_to(jnp.arange(first_query, first_query + T), (B, T))
  kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  starts = jnp.array([[0], [boundary]])[:B]
  vis = dict(q_positions=q_positions, kv_positions=kv_positions,
             q_segment_ids=(q_positions >= starts).astype(jnp.int32),
             kv_segment_ids=(kv_positions >= starts).astype(jnp.int32))
  attn_q, attn_k = bf16(jax.random.normal(ks[0], (B, T, N, C))), bf16(jax.random.normal(ks[1], (B, S, C)))
  scale = C**-0.5
  logits = jnp.einsum("btnc,bsc->btns", attn_q, attn_k) * scale
  attn_lse = jax.nn.logsumexp(jnp.where(visible(**vis)[:, :, None, :], logits, -jnp.inf), axis=-1)
  idx = (bf16(jax.random.normal(ks[2], (B, T, I, H))), bf16(jax.random.normal(ks[3], (B, S, H))),
         jax.random.normal(ks[4], (B, T, I)) * (I * H) ** -0.5)
  return (attn_q, attn_k, attn_lse, scale), idx, vis


def _saved_statistics(attn, idx, vis):
  """The forward's residuals for the backward, from the XLA formulas: logsumexp(I) and z = sum p per token."""
  scores = indexer_reference.index_scores(*idx, **vis)
  logits = jnp.einsum("btnc,bsc->btns", attn[0], attn[1]) * attn[3]
  z = jnp.where(visible(**vis), jnp.exp(logits - attn[2][..., None]).sum(2), 0.0).sum(-1)
  return jax.nn.logsumexp(scores, axis=-1), z


def _assert_close_to_scale(got, want, rel):
  """max |got - want| <= rel * max |want| per leaf: the bf16 kernels round dL to bf16, which moves small
  entries by more than any elementwise rtol."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_less(np.abs(np.asarray(g) - np.asarray(w)).max(), rel * np.abs(np.asarray(w)).max())


class PallasDenseKLTest(parameterized.TestCase):
  """The Mosaic GPU kernels in interpret mode (race detection on): statistics forward, backward, and the
  XLA backward kept as the deterministic path."""

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.named_parameters(
      # 2 documents in row 1 (one query sees only itself, key tiles before its document skipped), ragged T
      # and S, index heads padded 8 -> 16; the XLA backward (deterministic), exact up to float32 rounding.
      ("segments_ragged", 2, 7, 150, 16, 128, 8, 64, 146, 143, True),
      # V3.2 widths (576-dim latent key, 128-dim index key) with few heads; later key tiles skipped causally;
      # the backward kernel, which rounds dL to bf16.
      ("v32_widths", 1, 3, 200, 16, 576, 16, 128, 0, 117, False),
  )
  def test_matches_reference(self, B, T, S, N, C, I, H, boundary, first_query, deterministic):  # noqa: N803
    attn, idx, vis = _kernel_inputs(time.time_ns(), B, T, S, N, C, I, H, boundary, first_query)

    def loss(fn, *idx_args, **kw):
      kl = fn(*attn, *idx_args, **vis, **kw)
      return kl.sum(), kl

    (_, got), got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
        api.dense_kl, *idx, implementation="pallas", interpret=True, t_chunk=4, s_chunk=64,
        deterministic=deterministic)
    self.assertFalse(gpu_callbacks.get_races().races_found)
    (_, want), want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(reference.dense_kl, *idx)
    chex.assert_shape(got, (B, T))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    if deterministic:
      chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)
    else:
      _assert_close_to_scale(got_grads, want_grads, 1e-2)
    if boundary:  # the query at the document start sees one key: both distributions are one-hot
      np.testing.assert_allclose(got[1, boundary - first_query], 0.0, atol=1e-6)

  @parameterized.named_parameters(
      # Ragged T and S; row 1 starts a document at key 146, so query 146 sees only itself and the tiles
      # before 128 are skipped; index heads 8 -> 64, dims 64.
      ("segments_ragged", 2, 7, 150, 16, 128, 8, 64, 146, 143, False),
      # V3.2 index widths (64 heads x 128, two column slabs) at a 192-dim latent key; the last query of row 1
      # belongs to no key's document (z = 0: no gradient).
      ("v32_index_no_keys", 2, 5, 70, 16, 192, 64, 128, 66, 62, True),
  )
  def test_backward_kernel_matches_xla_backward(self, B, T, S, N, C, I, H, boundary, first_query,  # noqa: N803
                                                orphan):
    attn, idx, vis = _kernel_inputs(time.time_ns(), B, T, S, N, C, I, H, boundary, first_query)
    if orphan:
      vis = dict(vis, q_segment_ids=vis["q_segment_ids"].at[1, -1].set(7))
    lse_scores, z = _saved_statistics(attn, idx, vis)
    g = jax.random.normal(jax.random.key(time.time_ns()), (B, T))
    got = kernel_dense_bwd.dense_grads(*attn, *idx, lse_scores, z, g, **vis,
                                       interpret=plgpu.InterpretGPUParams(detect_races=True))
    self.assertFalse(gpu_callbacks.get_races().races_found)
    want = dense_bwd.dense_kl_grads(*attn, *idx, lse_scores, z, g, **vis, t_chunk=4, s_chunk=32)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    _assert_close_to_scale(got[:2], want[:2], 1e-2)  # d idx_q, d idx_k: through bf16 dL
    chex.assert_trees_all_close(got[2], want[2], rtol=1e-4, atol=1e-5)  # d idx_w: float32 from L and dI
    if orphan:  # the last query of row 1 sees no key: KL = 0, no gradient
      np.testing.assert_array_equal(got[0][1, -1], 0.0)
      np.testing.assert_array_equal(got[2][1, -1], 0.0)

  def test_backward_matches_reference_vjp(self):
    """`dense_bwd` alone (float32, no kernel; its early query chunks skip the last key chunk)."""
    attn, idx, vis = _inputs(time.time_ns())
    lse_scores, z = _saved_statistics(attn, idx, vis)
    g = jax.random.normal(jax.random.key(3), (B, T))
    got = dense_bwd.dense_kl_grads(*attn, *idx, lse_scores, z, g, **vis, t_chunk=5, s_chunk=16)
    _, vjp = jax.vjp(lambda *a: reference.dense_kl(*attn, *a, **vis), *idx)
    chex.assert_trees_all_close(got, vjp(g), rtol=1e-4, atol=1e-5)

  def test_supports(self):
    self.assertTrue(kernel_dense.supports(128, 576, 64, 128))  # V3.2: 7 ring slots beside 160 KiB of queries
    self.assertTrue(kernel_dense.supports(16, 320, 16, 64))
    self.assertFalse(kernel_dense.supports(512, 576, 64, 128))  # more heads than one wgmma N
    self.assertFalse(kernel_dense.supports(192, 576, 64, 128))  # queries leave no room for the ring
    self.assertEqual(kernel_dense_bwd.stages_for(128, 576, 128), 4)  # V3.2: 4 ring slots beside 190 KiB
    self.assertTrue(kernel_dense_bwd.supports(128, 576, 64, 128))
    self.assertFalse(kernel_dense_bwd.supports(128, 576, 128, 128))  # index heads beyond one wgmma M
    self.assertFalse(kernel_dense_bwd.supports(160, 576, 64, 128))  # queries leave no room for the ring


class PallasDenseKLLoweringTest(parameterized.TestCase):
  """V3.2 shapes at T = S = 128K through the whole Mosaic GPU lowering: forward and gradient (forward and
  backward kernels)."""

  def test_forward_and_grad_lower_for_h200(self):
    sd = jax.ShapeDtypeStruct
    T = 131072  # noqa: N806
    args = (sd((1, T, 128, 576), jnp.bfloat16), sd((1, T, 576), jnp.bfloat16), sd((1, T, 128), jnp.float32),
            sd((1, T, 64, 128), jnp.bfloat16), sd((1, T, 128), jnp.bfloat16), sd((1, T, 64), jnp.float32),
            *[sd((1, T), jnp.int32)] * 4)

    def loss(q, k, lse, iq, ik, w, q_pos, kv_pos, q_seg, kv_seg):
      return api.dense_kl(q, k, lse, 0.1352338, iq, ik, w, q_positions=q_pos, kv_positions=kv_pos,
                          q_segment_ids=q_seg, kv_segment_ids=kv_seg, implementation="pallas",
                          deterministic=False).sum()

    with jax.sharding.use_abstract_mesh(H200):
      for f, kernels in ((loss, 1), (jax.grad(loss, argnums=(3, 4, 5)), 2)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        self.assertLen(re.findall(r"custom_call @mosaic_gpu", text), kernels)
