"""MLA decode: one contract for every implementation of `api.sparse_mla_decode` / `api.dense_mla_decode` against the
float32 reference (invalid indices, rows with fewer than K valid, lengths 0, split-K against unsplit, FP8 against
bf16 cache), run for XLA and for the Pallas kernel in GPU interpret mode; the merge and split rule; cross-lowering
of the kernel for an H200 at V3.2 shapes; the benchmark module."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)

from pallas_kernels.lightning_indexer.reference import quantize_e4m3
from pallas_kernels.mla_decode import api, bench, reference, split_k
from tests.pallas_kernels.mosaic_checks import INTERPRET, SMEM_PER_BLOCK, lower_for_h200, no_races

SCALE = 0.1
PAGE = 16


def make_cache(seed, rows, C=128, R=64):  # noqa: N803
  """bf16 kv_nope [rows, C] and kv_rope [rows, R]."""
  ks = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(ks[0], (rows, C), jnp.float32).astype(jnp.bfloat16),
          jax.random.normal(ks[1], (rows, R), jnp.float32).astype(jnp.bfloat16))


def make_query(seed, Q, N, D):  # noqa: N803
  return jax.random.normal(jax.random.key(seed), (Q, N, D), jnp.float32).astype(jnp.bfloat16)


def make_indices(seed, Q, K, rows, invalid=0.1):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed))
  idx = jax.random.randint(ks[0], (Q, K), 0, rows)
  return jnp.where(jax.random.uniform(ks[1], idx.shape) < invalid, -1, idx).astype(jnp.int32)


def to_fp8(kv_nope):
  """The FP8 cache of bf16 latents: e4m3 values and one scale per 128-value tile (one tile when C < 128)."""
  return quantize_e4m3(kv_nope, min(128, kv_nope.shape[-1]))


def _f32(x):
  return x.astype(jnp.float32)


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


class MLADecodeContract(parameterized.TestCase):
  """What every implementation computes: `reference.sparse_mla_decode` in float32. Runs through subclasses only."""

  IMPLEMENTATION = None
  OPTIONS = {}

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  def assert_ran_cleanly(self):
    """Checks specific to the implementation after each call (interpret mode: no races)."""

  def assert_matches(self, got, want, values):
    """out within 2^-6 max|v|: the kernel rounds the softmax weights to bf16 (2^-8 relative, weights sum to 1),
    each split-K partial and the result to bf16 (2^-9 each) and takes exp2 approximately on the GPU: 2^-7 max|v|,
    with a factor 2 of margin; the XLA path only rounds out (2^-9). lse: float32 sums of 192 products (~1e-5)."""
    (out, lse), (want_out, want_lse) = got, want
    chex.assert_trees_all_equal_shapes_and_dtypes((out, lse), (want_out.astype(jnp.bfloat16), want_lse))
    chex.assert_trees_all_close(_f32(out), want_out, atol=2**-6 * float(jnp.max(jnp.abs(values))), rtol=0)
    chex.assert_trees_all_equal(jnp.isneginf(lse), jnp.isneginf(want_lse))
    chex.assert_trees_all_close(_finite(lse), _finite(want_lse), atol=1e-3, rtol=1e-3)

  def sparse(self, q, kv_nope, kv_scale, kv_rope, idx, **kwargs):
    got = api.sparse_mla_decode(q, kv_nope, kv_scale, kv_rope, idx, scale=SCALE,
                                implementation=self.IMPLEMENTATION, **self.OPTIONS, **kwargs)
    self.assert_ran_cleanly()
    want = reference.sparse_mla_decode(_f32(q), kv_nope, kv_scale, kv_rope, idx, scale=SCALE)
    self.assert_matches(got, want, reference.dequantize(kv_nope, kv_scale))
    return got

  @parameterized.named_parameters(
      ("one_head_tile", 3, 64, 48, 70, 128, None),  # K = 70: a second 64-key block mostly padding; repeats (K > rows)
      ("small_heads_split2", 2, 16, 40, 150, 128, 2),  # 16 heads padded to a tile; two parts of two blocks
      ("two_head_tiles_split3", 1, 80, 300, 200, 256, 3),  # 80 heads: the second tile padded; C = 256
  )
  def test_sparse_matches_reference(self, Q, N, rows, K, C, splits):  # noqa: N803
    kv_nope, kv_rope = make_cache(0, rows, C)
    self.sparse(make_query(1, Q, N, C + 64), kv_nope, None, kv_rope, make_indices(2, Q, K, rows), num_splits=splits)

  def test_invalid_and_short_rows(self):
    """Row 0 has fewer than K valid indices (its tail -1), row 1 none (out 0, lse -inf), row 2 all valid."""
    kv_nope, kv_rope = make_cache(3, 64)
    idx = make_indices(4, 3, 128, 64, invalid=0.0).at[0, 40:].set(-1).at[1].set(-1)
    out, lse = self.sparse(make_query(5, 3, 16, 192), kv_nope, None, kv_rope, idx, num_splits=2)
    chex.assert_trees_all_equal(out[1], jnp.zeros_like(out[1]))
    self.assertTrue(bool(jnp.all(jnp.isneginf(lse[1]))))

  def test_split_k_matches_unsplit(self):
    """Four parts (the last ones past row 0's valid keys: empty partials) against one part."""
    kv_nope, kv_rope = make_cache(6, 96)
    q, idx = make_query(7, 2, 16, 192), make_indices(8, 2, 256, 96).at[0, 100:].set(-1)
    one = self.sparse(q, kv_nope, None, kv_rope, idx, num_splits=1)
    four = self.sparse(q, kv_nope, None, kv_rope, idx, num_splits=4)
    chex.assert_trees_all_close(_f32(four[0]), _f32(one[0]), atol=2**-6 * float(jnp.max(jnp.abs(_f32(kv_nope)))))
    chex.assert_trees_all_close(four[1], one[1], atol=1e-4, rtol=1e-4)

  def test_dense_through_block_table(self):
    """Pages out of order in the pool; lengths 0, inside a page, a whole page, all pages."""
    pages, max_pages = 12, 4
    kv_nope, kv_rope = make_cache(9, pages * PAGE)
    table = jax.random.permutation(jax.random.key(10), pages)[:4 * max_pages].reshape(3, max_pages)
    table = jnp.concatenate([table, table[:1]]).astype(jnp.int32)
    lengths = jnp.array([0, 21, PAGE, max_pages * PAGE], jnp.int32)
    q = make_query(11, 4, 16, 192)
    got = api.dense_mla_decode(q, kv_nope, None, kv_rope, table, lengths, scale=SCALE, page_size=PAGE,
                               num_splits=2, implementation=self.IMPLEMENTATION, **self.OPTIONS)
    self.assert_ran_cleanly()
    want = reference.dense_mla_decode(_f32(q), kv_nope, None, kv_rope, table, lengths, scale=SCALE, page_size=PAGE)
    self.assert_matches(got, want, _f32(kv_nope))
    self.assertTrue(bool(jnp.all(jnp.isneginf(got[1][0]))))


class TestXLA(MLADecodeContract):
  IMPLEMENTATION = "xla"

  def test_fp8_cache_equals_bf16_cache_of_its_values(self):
    """The e4m3 cache (power-of-two scales here, so that fp8 * scale is exact in bf16) against the bf16 cache of the
    dequantised values: the same float32 keys and values, so the same out and lse."""
    kv_nope, kv_rope = make_cache(12, 80)
    c8, s = to_fp8(kv_nope)
    q, idx = make_query(13, 2, 16, 192), make_indices(14, 2, 100, 80)
    fp8 = self.sparse(q, c8, s, kv_rope, idx)
    bf16 = self.sparse(q, reference.dequantize(c8, s).astype(jnp.bfloat16), None, kv_rope, idx)
    chex.assert_trees_all_equal(fp8, bf16)

  def test_fp8_cache_against_the_unquantised_cache(self):
    """e4m3 keeps 3 mantissa bits (2^-4 relative rounding): out within 2^-3 max|v| of the bf16 cache's."""
    kv_nope, kv_rope = make_cache(15, 64, C=64)  # C < 128: one scale per row
    c8, s = to_fp8(kv_nope)
    q, idx = make_query(16, 2, 16, 128), make_indices(17, 2, 64, 64)
    fp8_out, _ = self.sparse(q, c8, s, kv_rope, idx)
    bf16_out, _ = self.sparse(q, kv_nope, None, kv_rope, idx)
    chex.assert_trees_all_close(_f32(fp8_out), _f32(bf16_out), atol=2**-3 * float(jnp.max(jnp.abs(_f32(kv_nope)))))

  def test_memory_rule_splits_long_dense_rows(self):
    """Parts bound the float32 temporaries: 128 rows of 128K keys need many; a decode step of 2K keys needs one."""
    q = jax.ShapeDtypeStruct((128, 128, 576), jnp.bfloat16)
    self.assertGreater(api._xla_splits(q, 131072), 100)  # noqa: SLF001
    self.assertEqual(api._xla_splits(jax.ShapeDtypeStruct((1, 16, 320), jnp.bfloat16), 2048), 1)  # noqa: SLF001


class TestPallasInterpret(MLADecodeContract):
  """The Mosaic GPU kernel in GPU interpret mode, with race detection."""

  IMPLEMENTATION, OPTIONS = "pallas", dict(interpret=True)

  def assert_ran_cleanly(self):
    self.assertFalse(gpu_callbacks.get_races().races_found)


del MLADecodeContract  # the contract runs through its subclasses only


class ArgumentsTest(parameterized.TestCase):

  def test_default_num_splits(self):
    self.assertEqual(split_k.default_num_splits(1, 2048, 2), 16)  # half of 32 key blocks
    self.assertEqual(split_k.default_num_splits(1, 131072, 2), 66)  # one wave of 132 SMs
    self.assertEqual(split_k.default_num_splits(32, 2048, 2), 2)
    self.assertEqual(split_k.default_num_splits(128, 2048, 2), 1)
    self.assertEqual(split_k.default_num_splits(1, 64, 1), 1)

  def test_merge_of_empty_parts(self):
    out = jnp.ones((1, 2, 1, 4))
    lse = jnp.array([[[-jnp.inf], [-jnp.inf]]])
    merged, merged_lse = split_k.merge(out, lse)
    chex.assert_trees_all_equal(merged, jnp.zeros((1, 1, 4)))
    self.assertTrue(bool(jnp.isneginf(merged_lse[0, 0])))

  def test_errors_name_the_tensor(self):
    kv_nope, kv_rope = make_cache(0, 32)
    q, idx = make_query(1, 2, 16, 192), make_indices(2, 2, 8, 32)
    c8, s = to_fp8(kv_nope)
    with self.assertRaisesRegex(ValueError, r"q has shape \(2, 16, 100\); allowed: \[Q, N, C \+ R\] = \[Q, N, 192\]"):
      api.sparse_mla_decode(q[..., :100], kv_nope, None, kv_rope, idx, scale=SCALE)
    with self.assertRaisesRegex(ValueError, r"kv_nope float8_e4m3fn with kv_scale None; allowed"):
      api.sparse_mla_decode(q, c8, None, kv_rope, idx, scale=SCALE)
    with self.assertRaisesRegex(ValueError, r"indices has 3 rows; allowed: one per query row \(Q = 2\)"):
      api.sparse_mla_decode(q, kv_nope, None, kv_rope, idx[:1].repeat(3, 0), scale=SCALE)
    with self.assertRaisesRegex(ValueError, r"num_splits=0; allowed"):
      api.sparse_mla_decode(q, kv_nope, None, kv_rope, idx, scale=SCALE, num_splits=0)
    with self.assertRaisesRegex(ValueError, r"mla_decode.kernel: .* not supported; allowed: a bf16 cache"):
      api.sparse_mla_decode(q, c8, s, kv_rope, idx, scale=SCALE, implementation="pallas")  # FP8 with C = 128


def _v32_shapes(q_rows: int, pool_rows: int = 131072, k: int = 2048):
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  return (bf16(q_rows, 128, 576), bf16(pool_rows, 512), None, bf16(pool_rows, 64),
          jax.ShapeDtypeStruct((q_rows, k), jnp.int32))


class LoweringTest(parameterized.TestCase):
  """Cross-lowering for an H200 at V3.2 shapes (128 heads, 576 / 512, K = 2048 of a 128K-row pool)."""

  @parameterized.named_parameters(("batch1", 1, 16), ("batch32", 32, 2), ("batch128", 128, 1))
  def test_sparse_kernel(self, q_rows, splits):
    self.assertEqual(split_k.default_num_splits(q_rows, 2048, 2), splits)
    fn = functools.partial(api.sparse_mla_decode, scale=0.135, implementation="pallas")
    (launch,) = lower_for_h200(fn, *_v32_shapes(q_rows)).launches
    self.assertEqual(launch.grid, (q_rows * splits * 2, 1, 1))  # (row, part, head tile) on CUDA x
    self.assertEqual(launch.block, (3 * 128, 1, 1))
    self.assertBetween(launch.smem_bytes, (64 * 576 + 2 * 64 * 576 + 64 * 64) * 2, SMEM_PER_BLOCK)
    self.assertGreater(launch.count("nvvm.cp.async.shared.global"), 0)

  def test_dense_kernel(self):
    """Batch 1 at 128K positions through a block table of 64-row pages: 66 parts (one wave)."""
    q, kv_nope, _, kv_rope, _ = _v32_shapes(1)
    fn = functools.partial(api.dense_mla_decode, scale=0.135, page_size=64, implementation="pallas")
    table, lengths = jax.ShapeDtypeStruct((1, 2048), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    (launch,) = lower_for_h200(fn, q, kv_nope, None, kv_rope, table, lengths).launches
    self.assertEqual(launch.grid, (66 * 2, 1, 1))


def check_fp8_kernel_in_interpret_mode():
  """`api.sparse_mla_decode` on an FP8 cache with "pallas" (kernel_fwd's FP8 variant) in GPU interpret mode against
  the float32 reference: C = 256 (two 128-value tiles per value half), 16 heads, 10% -1 indices, split-K in 2 parts
  of 3 key blocks (a stage refilled), race detection on. Run by `FP8KernelTest` in a subprocess (see there)."""
  rows, q_rows, heads, k, c = 300, 2, 16, 384, 256
  kv_nope, kv_rope = make_cache(20, rows, c)
  c8, s = to_fp8(kv_nope)
  q, idx = make_query(21, q_rows, heads, c + 64), make_indices(22, q_rows, k, rows)
  with no_races():
    out, lse = jax.block_until_ready(api.sparse_mla_decode(q, c8, s, kv_rope, idx, scale=SCALE, num_splits=2,
                                                           implementation="pallas", interpret=True))
  want_out, want_lse = reference.sparse_mla_decode(_f32(q), c8, s, kv_rope, idx, scale=SCALE)
  # out: as `MLADecodeContract.assert_matches` (2^-6 max|v|); dequantising rounds each e4m3 x scale to bf16 too
  # (2^-9 relative), inside that margin. lse: float32 sums of 320 products with the same dequantised values.
  chex.assert_trees_all_close(_f32(out), want_out, atol=2**-6 * float(jnp.max(jnp.abs(reference.dequantize(c8, s)))),
                              rtol=0)
  chex.assert_trees_all_close(lse, want_lse, atol=1e-3, rtol=1e-3)


class FP8KernelTest(parameterized.TestCase):
  """The FP8 cache through the kernel (kernel_fwd's FP8 variant): interpret mode and cross-lowering."""

  def test_interpret_matches_reference_without_races(self):
    """In a subprocess with XLA's concurrency-optimised CPU scheduler off: GPU interpret mode runs each warpgroup
    as an XLA CPU program on its own Python thread, but that scheduler dispatches a program's independent thunks
    to XLA's shared intra-op pool (2 threads on a 2-core machine), where barrier-wait callbacks of two warpgroups
    can hold every pool thread while the arrival they wait for queues behind them: the variant hangs there. A
    GPU runs the three warpgroups concurrently; the flag only makes each program run in order on its own thread.
    XLA reads XLA_FLAGS once per process, hence the subprocess."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                      + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip())
    code = "from tests.pallas_kernels.test_mla_decode import check_fp8_kernel_in_interpret_mode as c; c()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])

  @parameterized.named_parameters(("batch1", 1, 16), ("batch128", 128, 1))
  def test_lowers_within_smem_at_v32_shapes(self, q_rows, splits):
    """128 heads, C = 512 + R = 64, K = 2048 of a 128K-row pool: Q's rope chunk passes through the P buffer
    (8 KiB saved) so that the plan fits (225360 bytes lowered in Dec 2026)."""
    q, kv_nope, _, kv_rope, idx = _v32_shapes(q_rows)
    c8, scales = (jax.ShapeDtypeStruct(kv_nope.shape, jnp.float8_e4m3fn),
                  jax.ShapeDtypeStruct((kv_nope.shape[0], 4), jnp.float32))
    fn = functools.partial(api.sparse_mla_decode, scale=0.135, implementation="pallas")
    (launch,) = lower_for_h200(fn, q, c8, scales, kv_rope, idx).launches
    self.assertLessEqual(launch.smem_bytes, SMEM_PER_BLOCK)
    self.assertEqual(launch.grid, (q_rows * splits * 2, 1, 1))
    self.assertGreater(launch.count("nvvm.cp.async.shared.global"), 0)


class BenchTest(absltest.TestCase):

  def test_sections(self):
    self.assertEqual(set(bench.SECTIONS), {"mla_decode"})

  def test_bytes_moved(self):
    """bf16: 1152 bytes per entry; FP8: 656 (512 + 16 + 128), plus q (bf16) and out (bf16)."""
    self.assertEqual(bench.bytes_moved(rows=1, keys=1, heads=1, fp8=False), 1152 + 1152 + 1024)
    self.assertEqual(bench.bytes_moved(rows=1, keys=1, heads=1, fp8=True), 656 + 1152 + 1024)


if __name__ == "__main__":
  absltest.main()
