"""Sparse MLA: one contract for every implementation of `api.sparse_mla` (out, lse and gradients against the float32
reference on fresh random inputs with fixed seeds, invalid and repeated indices), run for XLA and for the Pallas
kernels in GPU interpret mode with either backward; the reference's gradients by finite differences and the chunked
backward's padding; cross-lowering of the kernels for an H200 at V3.2 shapes; the benchmark module."""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

from pallas_kernels.benchmarking import timing
from pallas_kernels.sparse_mla import api, bench, chunked_bwd, kernel_bwd, kernel_fwd, reference
from tests.pallas_kernels.mosaic_checks import SMEM_PER_BLOCK, lower_for_h200, no_races

SCALE = 0.1


def make_inputs(seed, B, T, N, S, K, C=128, R=64, invalid=0.1, low=0):  # noqa: N803
  """Random bf16 q [B, T, N, C + R], kv [B, S, C + R]; indices [B, T, K] uniform in [low, S), a fraction `invalid`
  of them -1 (duplicates within a row occur where K is near S)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, N, C + R), jnp.float32).astype(jnp.bfloat16)
  kv = jax.random.normal(ks[1], (B, S, C + R), jnp.float32).astype(jnp.bfloat16)
  idx = jax.random.randint(ks[2], (B, T, K), low, S)
  return q, kv, jnp.where(jax.random.uniform(ks[3], idx.shape) < invalid, -1, idx)


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


class SparseMLAContract(parameterized.TestCase):
  """What every implementation of `api.sparse_mla` computes: `reference.sparse_mla` in float32, its out and lse and
  their vjp w.r.t. q and kv (cotangents on both outputs). Runs only through its subclasses (deleted below)."""

  IMPLEMENTATION = None
  OPTIONS = {}

  def checked_kernels(self):
    """Context of each call: what the implementation must show about the kernels run inside (interpret mode: that
    they ran and none raced)."""
    return contextlib.nullcontext()

  def check_against_reference(self, q, kv, idx, v_dim: int, seed: int = 1):
    """out, lse, dq, dkv of the implementation on bf16 inputs, checked against the float32 reference; returned."""
    f = lambda q, kv: api.sparse_mla(q, kv, idx, scale=SCALE, v_dim=v_dim, implementation=self.IMPLEMENTATION,
                                     **self.OPTIONS)
    with self.checked_kernels():
      (out, lse), vjp = jax.vjp(f, q, kv)
      ks = jax.random.split(jax.random.key(seed))
      do = jax.random.normal(ks[0], out.shape).astype(jnp.bfloat16)
      dlse = jnp.where(jnp.isfinite(lse), jax.random.normal(ks[1], lse.shape), 0.0)
      dq, dkv = vjp((do, dlse))
    ref = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=SCALE, v_dim=v_dim)
    (want_out, want_lse), want_vjp = jax.vjp(ref, _f32(q), _f32(kv))
    want_dq, want_dkv = want_vjp((_f32(do), dlse))
    chex.assert_trees_all_equal_shapes_and_dtypes((out, lse, dq, dkv), (do, want_lse, q, kv))
    chex.assert_trees_all_close(_f32(out), want_out, atol=2e-2, rtol=2e-2)
    chex.assert_trees_all_equal(jnp.isneginf(lse), jnp.isneginf(want_lse))
    chex.assert_trees_all_close(_finite(lse), _finite(want_lse), atol=1e-3, rtol=1e-3)
    for got, want in ((dq, want_dq), (dkv, want_dkv)):
      chex.assert_trees_all_close(_f32(got), want, atol=2e-2 * float(jnp.max(jnp.abs(want))), rtol=2e-2)
    return out, lse, dq, dkv

  @parameterized.named_parameters(
      # one whole 64-head tile (the other cases pad 16 or 80 heads); K = 70: two 64-key blocks, the second mostly
      # padding
      ("one_head_tile", 1, 2, 64, 40, 70, 128),
      # 80 heads: two head tiles, the second padded; K = 150: three blocks, both index slots reused
      ("two_head_tiles_batch2", 2, 1, 80, 40, 150, 128),
      # v_dim 256: 128-column latent chunks (the kernel's 128-column dkv slabs) beside the 64 rope columns
      ("wide_latent", 1, 2, 16, 40, 70, 256),
  )
  def test_matches_reference(self, B, T, N, S, K, C):  # noqa: N803
    q, kv, idx = make_inputs(0, B, T, N, S, K, C)
    self.check_against_reference(q, kv, idx, v_dim=C)

  def test_invalid_indices(self):
    """-1 entries add nothing: a query with none valid gives out 0, lse -inf and dq 0; row 0, which only invalid
    entries would touch, gets no gradient."""
    q, kv, idx = make_inputs(2, 1, 2, 16, 24, 64, invalid=0.5, low=1)
    idx = idx.at[:, 1].set(-1)
    out, lse, dq, dkv = self.check_against_reference(q, kv, idx, v_dim=128)
    chex.assert_trees_all_equal(out[:, 1], jnp.zeros_like(out[:, 1]))
    self.assertTrue(bool(jnp.all(jnp.isneginf(lse[:, 1]))))
    chex.assert_trees_all_equal(dq[:, 1], jnp.zeros_like(dq[:, 1]))
    chex.assert_trees_all_equal(dkv[:, 0], jnp.zeros_like(dkv[:, 0]))

  def test_repeated_indices(self):
    """A key selected many times by one query (it counts each time) and by every query (its dkv row sums them);
    keys that no query selects get no gradient."""
    q, kv, idx = make_inputs(3, 1, 2, 16, 24, 64, invalid=0.0)
    idx = (idx % 12).at[:, :, :8].set(3).at[:, :, 8].set(5)
    _, _, _, dkv = self.check_against_reference(q, kv, idx, v_dim=128)
    chex.assert_trees_all_equal(dkv[:, 12:], jnp.zeros_like(dkv[:, 12:]))


class TestXLA(SparseMLAContract):
  IMPLEMENTATION = "xla"


class TestPallasInterpret(SparseMLAContract):
  """The Mosaic GPU forward and backward kernels in GPU interpret mode, with race detection."""

  IMPLEMENTATION, OPTIONS = "pallas", dict(interpret=True)
  KERNELS = 2  # the forward and the backward kernel

  def checked_kernels(self):
    return no_races(min_kernels=self.KERNELS)


class TestPallasDeterministicInterpret(TestPallasInterpret):
  """The forward kernel in GPU interpret mode with the chunked XLA backward."""

  OPTIONS, KERNELS = dict(interpret=True, deterministic=True), 1


del SparseMLAContract  # the contract runs through its subclasses only


class ReferenceAndChunkedTest(parameterized.TestCase):

  def test_reference_gradients_by_finite_differences(self):
    q, kv, idx = make_inputs(4, 1, 3, 2, 6, 4, C=8, R=4, invalid=0.3)
    q, kv = _f32((q, kv))
    idx = idx.at[:, :, 0].set(1)  # no empty row: lse = -inf has no finite derivative
    f = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.3, v_dim=8)
    jax.test_util.check_grads(f, (q, kv), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)

  def test_chunked_backward_pads_query_blocks(self):
    """T = 5 in blocks of 2 (the last one padded with invalid queries), a query with no valid key."""
    q, kv, idx = make_inputs(5, 2, 5, 4, 24, 16, C=16, R=8, invalid=0.2)
    q, kv = _f32((q, kv))
    idx = idx.at[:, -1].set(-1)
    (out, lse), vjp = jax.vjp(lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.2, v_dim=16), q, kv)
    ks = jax.random.split(jax.random.key(6))
    do = jax.random.normal(ks[0], out.shape)
    dlse = jnp.where(jnp.isfinite(lse), jax.random.normal(ks[1], lse.shape), 0.0)
    got = chunked_bwd.sparse_mla_bwd(q, kv, idx, out, lse, do, dlse, scale=0.2, v_dim=16, block_t=2)
    chex.assert_trees_all_close(got, vjp((do, dlse)), atol=1e-4, rtol=1e-4)


class KernelArgumentsTest(parameterized.TestCase):

  def test_supported_widths(self):
    self.assertTrue(kernel_fwd.supports(576, 512, jnp.bfloat16))
    self.assertTrue(kernel_fwd.supports(320, 256, jnp.bfloat16))
    self.assertFalse(kernel_fwd.supports(576, 512, jnp.float32))
    self.assertFalse(kernel_fwd.supports(560, 512, jnp.bfloat16))  # rope 48: not whole 64-column tiles
    with self.assertRaisesRegex(ValueError, r"Unsupported dims dk=560, v_dim=512"):
      kernel_fwd.column_chunks(560, 512)

  def test_config_rejects(self):
    with self.assertRaisesRegex(ValueError, r"block_k=96 must be a multiple of 64 in \[64, 256\]"):
      kernel_fwd.Config(block_k=96)
    with self.assertRaisesRegex(ValueError, r"stages=0 must be >= 1"):
      kernel_fwd.Config(stages=0)


def _v32_shapes(t: int = 131072):
  """q, kv, indices and the backward's out, lse, do, dlse at V3.2 shapes: T = t tokens (128K: the grid's token
  axis above CUDA's 65535 limit for y and z), K = 2048 of S = t latent rows, 128 heads."""
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return (bf16(1, t, 128, 576), bf16(1, t, 576), jax.ShapeDtypeStruct((1, t, 2048), jnp.int32),
          bf16(1, t, 128, 512), f32(1, t, 128), bf16(1, t, 128, 512), f32(1, t, 128))


CP_ASYNC = "nvvm.cp.async.shared.global"  # one 16-byte row-piece copy of the cp.async gather
ROW_PIECES = 4 * 9  # a 64-key block of 576-column rows: 4 passes of 16 rows x 9 lines of 64 columns per thread
TMA_REDUCE_ADD = "cp.reduce.async.bulk.tensor"


class LoweringTest(parameterized.TestCase):
  """Cross-lowering for an H200 at V3.2 shapes: what interpret mode cannot check (the cp.async gather, the TMA
  reduce-adds, the launch grid and the shared memory)."""

  def assert_launch(self, kernel, min_smem: int):
    """(token, head tile) pairs on CUDA x, three warpgroups, shared memory between the buffers and the limit."""
    self.assertEqual(kernel.grid, (131072 * 2, 1, 1))
    self.assertEqual(kernel.block, (3 * 128, 1, 1))
    self.assertBetween(kernel.smem_bytes, min_smem, SMEM_PER_BLOCK)

  def test_forward_kernel(self):
    (kernel,) = lower_for_h200(functools.partial(kernel_fwd.sparse_mla_fwd, scale=0.135, v_dim=512),
                               *_v32_shapes()[:3]).launches
    # Q tile 72 KiB + two gathered 64-key blocks 144 KiB + P 8 KiB
    self.assert_launch(kernel, (64 * 576 + 2 * 64 * 576 + 64 * 64) * 2)
    self.assertEqual(kernel.count(CP_ASYNC) % ROW_PIECES, 0)
    self.assertGreater(kernel.count(CP_ASYNC), 0)

  def test_backward_kernel(self):
    (kernel,) = lower_for_h200(functools.partial(kernel_bwd.sparse_mla_bwd, scale=0.135, v_dim=512),
                               *_v32_shapes()).launches
    # Q 72 KiB + dO 64 KiB + one key block 72 KiB + P^T, dS^T 16 KiB
    self.assert_launch(kernel, (64 * 576 + 64 * 512 + 64 * 576 + 2 * 64 * 64) * 2)
    self.assertEqual(kernel.count(CP_ASYNC), ROW_PIECES)  # one gathered block per iteration
    # One reduce-add site per 128-column dkv slab: [0, 256) from wg 0; [256, 512) and the 64 rope columns from wg 1.
    self.assertEqual(kernel.count(TMA_REDUCE_ADD), 5)

  @parameterized.named_parameters(("kernel_backward", False, 2), ("deterministic", True, 1))
  def test_gradient_through_api(self, deterministic, kernels):
    """The forward kernel, then the backward kernel or (deterministic) the chunked XLA backward."""
    loss = lambda q, kv, idx: jnp.sum(api.sparse_mla(q, kv, idx, scale=0.135, v_dim=512, implementation="pallas",
                                                     deterministic=deterministic)[0].astype(jnp.float32))
    lowered = lower_for_h200(jax.grad(loss, argnums=(0, 1)), *_v32_shapes()[:3]).launches
    self.assertLen(lowered, kernels)
    self.assertEqual(lowered[-1].count(TMA_REDUCE_ADD), 5 if not deterministic else 0)


class BenchTest(absltest.TestCase):

  def test_sections(self):
    self.assertEqual(set(bench.SECTIONS), {"sparse_mla", "sparse_mla_gather", "parity_shapes"})

  def test_memory_check_skips_what_does_not_fit(self):
    """`timing.fits_memory`, which the benchmark's XLA baselines go through, from XLA's plan of the compiled call."""
    q, kv, idx, _, _, do, dlse = _v32_shapes(16)
    autodiff = bench._fns()["autodiff"]  # noqa: SLF001
    self.assertTrue(timing.fits_memory("autodiff", autodiff, q, kv, idx, do, dlse))
    self.assertFalse(timing.fits_memory("autodiff", autodiff, q, kv, idx, do, dlse, budget=2**20))

if __name__ == "__main__":
  absltest.main()
