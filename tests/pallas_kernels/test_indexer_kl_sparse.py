"""Sparse-stage indexer KL through the Mosaic GPU kernels: values and indexer gradients in GPU interpret mode
(race detection on) against the materialising reference, with the row gathers issued by one warp and by four,
and lowering of the forward and the gradient for an H200 at V3.2 shapes."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.indexer_kl import api, kernel_sparse, kernel_sparse_bwd, reference, sparse_pallas
from pallas_kernels.visibility import visible

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))


def _inputs(seed, B, T, S, N, C, I, H, K):  # noqa: N803
  """bf16 inputs with the main attention's exact lse and distinct random indices per query.

  Queries are the last T positions. Row 1 (if any) starts a second document at position S - 2, so its last
  query sees keys S - 2 and S - 1 only (the other selected keys are masked). Every query selects key S // 2
  (repeated across queries); every 5th slot is -1; the first query of row 0 selects nothing valid.
  """
  ks = jax.random.split(jax.random.key(seed), 6)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  q_positions = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  starts = jnp.array([[0], [S - 2]])[:B]
  vis = dict(q_positions=q_positions, kv_positions=kv_positions,
             q_segment_ids=(q_positions >= starts).astype(jnp.int32),
             kv_segment_ids=(kv_positions >= starts).astype(jnp.int32))
  attn_q, attn_k = bf16(jax.random.normal(ks[0], (B, T, N, C))), bf16(jax.random.normal(ks[1], (B, S, C)))
  scale = C**-0.5
  logits = jnp.einsum("btnc,bsc->btns", attn_q.astype(jnp.float32), attn_k.astype(jnp.float32)) * scale
  attn_lse = jax.nn.logsumexp(jnp.where(visible(**vis)[:, :, None, :], logits, -jnp.inf), axis=-1)
  idx = (bf16(jax.random.normal(ks[2], (B, T, I, H))), bf16(jax.random.normal(ks[3], (B, S, H))),
         jax.random.normal(ks[4], (B, T, I)) * (I * H) ** -0.5)
  others = jnp.delete(jnp.arange(S), S // 2)
  perms = jax.vmap(lambda k: jax.random.permutation(k, others)[:K - 1])(jax.random.split(ks[5], B * T))
  indices = jnp.concatenate([jnp.full((B * T, 1), S // 2), perms], axis=1).reshape(B, T, K)
  indices = jnp.where(jnp.arange(K) % 5 == 4, -1, indices).at[0, 0].set(-1)
  return (attn_q, attn_k, attn_lse, scale), idx, indices, vis


class PallasSparseKLTest(parameterized.TestCase):
  """The forward and backward kernels in interpret mode, through `sparse_pallas`'s custom_vjp (from `api.sparse_kl`
  or directly, with a config)."""

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.named_parameters(
      # ragged K (two 64-key blocks, the second partly padding), index heads padded 8 -> 64; gather_warps None:
      # through `api.sparse_kl` with the default config (4 warps), otherwise `sparse_pallas` with that config
      ("ragged_k", 2, 2, 160, 16, 64, 8, 64, 70, None),
      ("ragged_k_gather_warps1", 2, 2, 160, 16, 64, 8, 64, 70, 1),
      # V3.2 key widths (576-dim latent key, 128-dim index key) with few heads; one block
      ("v32_widths_gather_warps4", 1, 2, 96, 16, 576, 16, 128, 40, 4),
      ("v32_widths_gather_warps1", 1, 2, 96, 16, 576, 16, 128, 40, 1),
  )
  def test_matches_reference(self, B, T, S, N, C, I, H, K, gather_warps):  # noqa: N803
    attn, idx, indices, vis = _inputs(time.time_ns(), B, T, S, N, C, I, H, K)
    g = jax.random.normal(jax.random.key(time.time_ns()), (B, T))

    def value_and_vjp(fn, **kw):
      kl, vjp = jax.vjp(lambda *a: fn(*attn, *a, indices, **vis, **kw), *idx)
      return kl, vjp(g)

    if gather_warps is None:
      got, got_grads = value_and_vjp(api.sparse_kl, implementation="pallas", interpret=True)
    else:
      got, got_grads = value_and_vjp(sparse_pallas.sparse_kl, interpret=True,
                                     config=kernel_sparse.Config(gather_warps=gather_warps))
    self.assertFalse(gpu_callbacks.get_races().races_found)
    want, want_grads = value_and_vjp(reference.sparse_kl)
    chex.assert_shape(got, (B, T))
    chex.assert_trees_all_equal_shapes_and_dtypes(got_grads, idx)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0, 0], 0.0)  # no valid key
    for gg, w in zip(got_grads, want_grads):  # bf16 operands of the backward's wgmmas
      chex.assert_trees_all_close(gg.astype(jnp.float32), w, atol=1e-2 * float(jnp.max(jnp.abs(w))), rtol=1e-2)
    if B > 1:  # the last query of row 1 sees keys S - 2, S - 1 at most: at most two valid selections
      self.assertLessEqual(int((kernel_sparse.selected_keys(indices, **vis)[1, -1] >= 0).sum()), 2)

  def test_supports(self):
    self.assertTrue(kernel_sparse.supports(128, 576, 64, 128))  # V3.2: 7 forward ring slots
    self.assertEqual(kernel_sparse_bwd.stages_for(*kernel_sparse.padded_dims(128, 576, 64, 128)), 3)
    self.assertTrue(kernel_sparse_bwd.supports(128, 576, 64, 128))
    self.assertTrue(kernel_sparse.supports(16, 320, 16, 64) and kernel_sparse_bwd.supports(16, 320, 16, 64))
    self.assertFalse(kernel_sparse.supports(128, 576, 128, 128))  # index heads beyond one wgmma M
    self.assertFalse(kernel_sparse_bwd.supports(160, 576, 64, 128))  # queries leave no room for the ring

  def test_automatic_choice_needs_bf16_fitting_sizes_and_few_keys(self):
    """On the GPU, `api.sparse_kl` picks the kernels by `_sparse_kernel_supports` (they beat XLA on the H200 over
    8K keys, not over 32K+)."""
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

  def test_config_gather_warps(self):
    self.assertEqual(kernel_sparse.Config().gather_warps, 4)
    self.assertEqual(kernel_sparse.Config().reduce_warps, 4)
    self.assertEqual(kernel_sparse.Config().gather, "cp_async")
    with self.assertRaisesRegex(ValueError, r"gather_warps=3 must be one of \(1, 2, 4\)"):
      kernel_sparse.Config(gather_warps=3)
    with self.assertRaisesRegex(ValueError, r"reduce_warps=8 must be one of \(1, 2, 4\)"):
      kernel_sparse.Config(reduce_warps=8)
    with self.assertRaisesRegex(ValueError, r"gather='ldg' must be one of \('tma', 'cp_async'\)"):
      kernel_sparse.Config(gather="ldg")
    with self.assertRaisesRegex(ValueError, "gather='cp_async' runs inline Mosaic GPU code"):
      kernel_sparse.ring_buffer(3, True, "cp_async")


class PallasSparseKLLoweringTest(parameterized.TestCase):
  """V3.2 shapes at T = S = 128K, K = 2048, through the whole Mosaic GPU lowering: forward and gradient, with
  the default config (cp.async gather, d ik reduce-adds from 4 warps; through `api.sparse_kl`), with one TMA
  gather warp, with the TMA gather and 4 reduce warps, and with the cp.async gather and one reduce warp.
  Interpret mode replaces the reduce-adds by partials and cannot run the cp.async gather, so only this
  compiles them."""

  @parameterized.named_parameters(("default", None, 4, "cp_async"), ("gather_warps1", 1, 1, "tma"),
                                  ("reduce_warps4", 4, 4, "tma"), ("cp_async_reduce_warps1", 4, 1, "cp_async"))
  def test_forward_and_grad_lower_for_h200(self, gather_warps, reduce_warps, gather):
    sd = jax.ShapeDtypeStruct
    T = 131072  # noqa: N806  (the grid's token axis above CUDA's 65535 limit for y and z)
    args = (sd((1, T, 128, 576), jnp.bfloat16), sd((1, T, 576), jnp.bfloat16), sd((1, T, 128), jnp.float32),
            sd((1, T, 64, 128), jnp.bfloat16), sd((1, T, 128), jnp.bfloat16), sd((1, T, 64), jnp.float32),
            sd((1, T, 2048), jnp.int32), *[sd((1, T), jnp.int32)] * 4)

    vis_names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")

    def loss(q, k, lse, iq, ik, w, indices, *vis):
      vis = dict(zip(vis_names, vis))
      if gather_warps is None:
        kl = api.sparse_kl(q, k, lse, 0.1352338, iq, ik, w, indices, **vis, implementation="pallas")
      else:
        kl = sparse_pallas.sparse_kl(q, k, lse, 0.1352338, iq, ik, w, indices, **vis,
                                     config=kernel_sparse.Config(gather_warps=gather_warps,
                                                                 reduce_warps=reduce_warps, gather=gather))
      return kl.sum()

    with jax.sharding.use_abstract_mesh(H200):
      for f, kernels in ((loss, 1), (jax.grad(loss, argnums=(3, 4, 5)), 2)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        self.assertGreaterEqual(text.count("mosaic_gpu"), kernels)


if __name__ == "__main__":
  absltest.main()
