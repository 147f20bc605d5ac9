"""Sparse MLA: the Mosaic GPU forward and backward kernels in interpret mode and the chunked backward against
the reference, reference gradients by finite differences, and lowering of the forward, of the Pallas
path's gradient and of the backward kernel with split gather warps for an H200 at production shapes."""

import functools
import time

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.mosaic import bulk_reduce
from pallas_kernels.sparse_mla import api, chunked_bwd, kernel_bwd, kernel_fwd, reference

H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))


def _inputs(seed, B, T, N, S, K, C=128, R=64, dtype=jnp.bfloat16):  # noqa: N803
  """Random q, kv and indices with invalid (-1) entries, one query with none valid, and a key that every
  query selects (repeated indices across queries)."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, N, C + R), jnp.float32).astype(dtype)
  kv = jax.random.normal(ks[1], (B, S, C + R), jnp.float32).astype(dtype)
  idx = jax.random.randint(ks[2], (B, T, K), -1, S)
  idx = idx.at[:, :, 0].set(S // 2).at[:, -1, :].set(-1)
  return q, kv, idx


class SparseMlaTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    gpu_callbacks.reset_gpu_interpret_mode_state()

  @parameterized.named_parameters(("heads16_pad", 1, 3, 16, 150, 1), ("heads64_batch2", 2, 2, 64, 128, 1),
                                  ("heads16_pad_gather_warps4", 1, 3, 16, 150, 4),
                                  ("heads80_adjacent_tiles", 1, 2, 80, 70, 4, True))
  def test_forward_kernel_matches_reference(self, B, T, N, K, gather_warps, adjacent_tiles=False):  # noqa: N803
    """With `adjacent_tiles` (two head tiles, the second padded) the CTAs enumerate (token, head tile) pairs."""
    q, kv, idx = _inputs(time.time_ns(), B, T, N, 40, K)
    config = kernel_fwd.Config(gather="tma", gather_warps=gather_warps, adjacent_tiles=adjacent_tiles)
    out, lse = kernel_fwd.sparse_mla_fwd(q, kv, idx, scale=0.1, v_dim=128, config=config,
                                         interpret=plgpu.InterpretGPUParams(detect_races=True))
    self.assertFalse(gpu_callbacks.get_races().races_found)
    want_out, want_lse = reference.sparse_mla(q, kv, idx, scale=0.1, v_dim=128)
    chex.assert_shape(out, (B, T, N, 128))
    chex.assert_trees_all_close(out.astype(jnp.float32), want_out.astype(jnp.float32), atol=2e-2, rtol=2e-2)
    chex.assert_trees_all_equal(jnp.isneginf(lse), jnp.isneginf(want_lse))
    chex.assert_trees_all_close(jnp.where(jnp.isfinite(lse), lse, 0.0), jnp.where(jnp.isfinite(want_lse), want_lse, 0.0),
                                atol=1e-3, rtol=1e-3)

  def test_reference_gradients(self):
    q, kv, idx = _inputs(time.time_ns(), 1, 3, 2, 6, 4, C=8, R=4, dtype=jnp.float32)
    idx = idx.at[:, -1, 0].set(1)  # no empty row: lse = -inf has no finite derivative
    f = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.3, v_dim=8)
    jax.test_util.check_grads(f, (q, kv), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)

  @parameterized.parameters(False, True)
  def test_backward_matches_reference_vjp(self, deterministic):
    q, kv, idx = _inputs(time.time_ns(), 2, 5, 4, 24, 16, C=16, R=8, dtype=jnp.float32)
    f = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.2, v_dim=16)
    (out, lse), vjp = jax.vjp(f, q, kv)
    do = jax.random.normal(jax.random.key(1), out.shape)
    dlse = jnp.where(jnp.isfinite(lse), jax.random.normal(jax.random.key(2), lse.shape), 0.0)
    want = vjp((do, dlse))
    got = chunked_bwd.sparse_mla_bwd(q, kv, idx, out, lse, do, dlse, scale=0.2, v_dim=16, block_t=2,
                                    deterministic=deterministic)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)

  @parameterized.named_parameters(("heads16_pad", 1, 3, 16, 70, 1), ("heads64_batch2", 2, 2, 64, 150, 1),
                                  ("heads16_pad_gather_warps4", 1, 3, 16, 70, 4),
                                  ("heads16_no_prefetch", 1, 2, 16, 100, 4, False),
                                  ("heads80_adjacent_tiles", 1, 2, 80, 70, 4, True, True))
  def test_backward_kernel_matches_reference_vjp(self, B, T, N, K, gather_warps, prefetch_idx=True,  # noqa: N803
                                                 adjacent_tiles=False):
    """K not a multiple of the 64-key block, -1 entries, a query with no valid key (lse = -inf) and a key
    that every query selects (its dkv row sums over queries). The index block is prefetched into two slots
    (the default; with K = 150, three blocks, both slots are used), or with `prefetch_idx=False` loaded after each release."""
    q, kv, idx = _inputs(time.time_ns(), B, T, N, 40, K)
    f32 = lambda x: x.astype(jnp.float32)
    f = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.1, v_dim=128)
    (out, lse), vjp = jax.vjp(f, f32(q), f32(kv))
    keys = jax.random.split(jax.random.key(time.time_ns()))
    do = jax.random.normal(keys[0], out.shape).astype(jnp.bfloat16)
    dlse = jnp.where(jnp.isfinite(lse), jax.random.normal(keys[1], lse.shape), 0.0)
    want = vjp((f32(do), dlse))
    got = kernel_bwd.sparse_mla_bwd(q, kv, idx, out.astype(jnp.bfloat16), lse, do, dlse, scale=0.1, v_dim=128,
                                    gather="tma", gather_warps=gather_warps, prefetch_idx=prefetch_idx,
                                    adjacent_tiles=adjacent_tiles,
                                    interpret=plgpu.InterpretGPUParams(detect_races=True))
    self.assertFalse(gpu_callbacks.get_races().races_found)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, (q, kv))
    for g, w in zip(got, want):
      chex.assert_trees_all_close(f32(g), w, atol=2e-2 * float(jnp.max(jnp.abs(w))), rtol=2e-2)

  def test_backward_kernel_wide_slabs_match_reference_vjp(self):
    """slab_cols=128 at v_dim = 256: 128-column slabs on the latent chunks, a 64-column one on the rope chunk
    (sharing the staging bytes, so it waits for the slab before it)."""
    q, kv, idx = _inputs(time.time_ns(), 1, 2, 16, 40, 70, C=256)
    f32 = lambda x: x.astype(jnp.float32)
    (out, lse), vjp = jax.vjp(lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.1, v_dim=256), f32(q), f32(kv))
    do = jax.random.normal(jax.random.key(time.time_ns()), out.shape).astype(jnp.bfloat16)
    dlse = jnp.zeros_like(lse)
    want = vjp((f32(do), dlse))
    got = kernel_bwd.sparse_mla_bwd(q, kv, idx, out.astype(jnp.bfloat16), lse, do, dlse, scale=0.1, v_dim=256,
                                    gather="tma", slab_cols=128, interpret=plgpu.InterpretGPUParams(detect_races=True))
    self.assertFalse(gpu_callbacks.get_races().races_found)
    for g, w in zip(got, want):
      chex.assert_trees_all_close(f32(g), w, atol=2e-2 * float(jnp.max(jnp.abs(w))), rtol=2e-2)

  @parameterized.parameters(False, True)
  def test_pallas_path_gradients_match_reference(self, deterministic):
    q, kv, idx = _inputs(time.time_ns(), 1, 2, 16, 32, 64)
    loss = lambda impl, **kw: (lambda q, kv: jnp.sum(jnp.sin(api.sparse_mla(
        q, kv, idx, scale=0.1, v_dim=128, implementation=impl, **kw)[0].astype(jnp.float32))))
    got = jax.grad(loss("pallas", interpret=True, deterministic=deterministic), argnums=(0, 1))(q, kv)
    want = jax.grad(loss("xla"), argnums=(0, 1))(q, kv)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), got),
                                jax.tree.map(lambda x: x.astype(jnp.float32), want), atol=3e-2, rtol=3e-2)

  def test_config_rejects_gather_warps(self):
    with self.assertRaisesRegex(ValueError, r"gather_warps=3 must be one of \(1, 2, 4\)"):
      kernel_fwd.Config(gather_warps=3)
    with self.assertRaisesRegex(ValueError, r"gather='ldg' must be one of \('tma', 'cp_async'\)"):
      kernel_fwd.Config(gather="ldg")
    with self.assertRaisesRegex(ValueError, r"skip='copies' must be '', 'math' or \(with gather='cp_async'\)"):
      kernel_fwd.Config(gather="tma", skip="copies")

  def test_backward_rejects_skip_and_reduce_warps(self):
    q, kv, idx = _inputs(0, 1, 1, 16, 40, 64)
    with self.assertRaisesRegex(ValueError, r"reduce_warps=3 must be one of \(1, 2, 4\)"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, gather="tma", reduce_warps=3)
    with self.assertRaisesRegex(ValueError, r"reduce='atomic' must be one of \('tma', 'red', 'bulk'\)"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, gather="tma", reduce="atomic")
    with self.assertRaisesRegex(ValueError, r"slab_cols=128 must be one of \(64, 128\), and 64 with reduce='red'"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, reduce="red", slab_cols=128)
    with self.assertRaisesRegex(ValueError, "reduce='red' runs inline Mosaic GPU code"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, gather="tma", reduce="red",
                                interpret=plgpu.InterpretGPUParams())
    with self.assertRaisesRegex(ValueError, "reduce='bulk' runs inline Mosaic GPU code"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, gather="tma", reduce="bulk",
                                interpret=plgpu.InterpretGPUParams())
    with self.assertRaisesRegex(ValueError, r"skip='copies' must be '', 'reduce' or \(with gather='cp_async'\)"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, gather="tma", skip="copies")

  def test_backward_rejects_release_options(self):
    q, kv, idx = _inputs(0, 1, 1, 16, 40, 64)
    args = (q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128], jnp.zeros(q.shape[:3]))
    with self.assertRaisesRegex(ValueError,
                                r"split_release=True needs gather='cp_async' \(got 'tma'\) and prefetch_idx=True"):
      kernel_bwd.sparse_mla_bwd(*args, scale=0.1, v_dim=128, gather="tma", split_release=True)
    with self.assertRaisesRegex(ValueError, r"split_release=True needs .* and prefetch_idx=True \(got False\)"):
      kernel_bwd.sparse_mla_bwd(*args, scale=0.1, v_dim=128, prefetch_idx=False, split_release=True)

  def test_cp_async_gather_refuses_interpret_mode(self):
    q, kv, idx = _inputs(0, 1, 1, 16, 40, 64)
    with self.assertRaisesRegex(ValueError, "gather='cp_async' runs inline Mosaic GPU code"):
      kernel_fwd.sparse_mla_fwd(q, kv, idx, scale=0.1, v_dim=128, config=kernel_fwd.Config(gather="cp_async"),
                                interpret=plgpu.InterpretGPUParams())
    with self.assertRaisesRegex(ValueError, "gather='cp_async' runs inline Mosaic GPU code"):
      kernel_bwd.sparse_mla_bwd(q, kv, idx, q[..., :128], jnp.zeros(q.shape[:3]), q[..., :128],
                                jnp.zeros(q.shape[:3]), scale=0.1, v_dim=128, gather="cp_async",
                                interpret=plgpu.InterpretGPUParams())

  @parameterized.parameters(("tma", 1), ("tma", 4), ("cp_async", 4))
  def test_forward_lowers_for_h200(self, gather, gather_warps):
    """V3.2 shapes: T=128K queries, K=2048 of S=128K latent rows, 128 heads. For the cp.async gather this
    is the only CPU check (interpret mode cannot run inline Mosaic GPU code): the H200 benchmark checks its
    outputs (`experiments/bench_sections/sparse_mla_gather.py`)."""
    args = (jax.ShapeDtypeStruct((1, 131072, 128, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 131072, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 131072, 2048), jnp.int32))
    f = functools.partial(kernel_fwd.sparse_mla_fwd, scale=0.135, v_dim=512,
                          config=kernel_fwd.Config(gather=gather, gather_warps=gather_warps))
    with jax.sharding.use_abstract_mesh(H200):
      text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)

  def test_backward_lowers_for_h200(self):
    """The gradient through the Pallas path at V3.2 shapes: T=128K tokens (the grid's token axis above
    CUDA's 65535 limit for y and z), K=2048, 128 heads."""
    args = (jax.ShapeDtypeStruct((1, 131072, 128, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 131072, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 131072, 2048), jnp.int32))
    loss = lambda q, kv, idx: jnp.sum(api.sparse_mla(q, kv, idx, scale=0.135, v_dim=512,
                                                     implementation="pallas")[0].astype(jnp.float32))
    with jax.sharding.use_abstract_mesh(H200):
      text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertGreaterEqual(text.count("mosaic_gpu"), 2)

  @parameterized.parameters(("tma", 1, "tma"), ("cp_async", 1, "tma"), ("cp_async", 4, "tma"), ("cp_async", 4, "red"),
                            ("cp_async", 4, "tma", 128), ("cp_async", 4, "bulk", 128))
  def test_backward_kernel_lowers_for_h200(self, gather, reduce_warps, reduce, slab_cols=64):
    """The backward kernel itself with each gather (TMA from 4 warps, cp.async), its dkv TMA reduce-adds from
    one or four warps, its bulk reduce-adds one row per thread or its `red_add` reductions from registers, at the
    V3.2 shapes above. (Interpret mode
    replaces the reduce-adds by per-token partials and cannot run `red_add`, so only this test compiles them.)"""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    args = (bf16(1, 131072, 128, 576), bf16(1, 131072, 576), jax.ShapeDtypeStruct((1, 131072, 2048), jnp.int32),
            bf16(1, 131072, 128, 512), jax.ShapeDtypeStruct((1, 131072, 128), jnp.float32),
            bf16(1, 131072, 128, 512), jax.ShapeDtypeStruct((1, 131072, 128), jnp.float32))
    f = functools.partial(kernel_bwd.sparse_mla_bwd, scale=0.135, v_dim=512, gather_warps=4, gather=gather,
                          reduce_warps=reduce_warps, reduce=reduce, slab_cols=slab_cols)
    with jax.sharding.use_abstract_mesh(H200):
      text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)
    if reduce == "bulk":  # 512-byte rows of the 128-column latent slabs, 256-byte ones of the rope slab
      for size in (512, 256):
        self.assertIn(f"cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$2], [$1], {size};", text)

  def test_bulk_reduce_rejects_shapes(self):
    """`bulk_reduce.add_rows` names the slab shape it cannot issue (rows not a multiple of 4 up to 128, rows
    or column offsets not whole 16-byte units) before emitting any code."""
    slab = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    for shape, col in (((66, 128), 0), ((256, 128), 0), ((64, 6), 0), ((64, 128), 2)):
      with self.assertRaisesRegex(ValueError, rf"staged \({shape[0]}, {shape[1]}\) at col={col}: rows must be"):
        bulk_reduce.add_rows(slab(*shape), None, None, col=col)

  def test_benchmark_backward_configs_lower_for_h200(self):
    """Every backward configuration of the GPU benchmark (`sparse_mla_gather.BACKWARD_CONFIGS`: with and without
    the index prefetch and the split release) is a valid call that lowers at the benchmark's shapes (8K keys,
    4096 queries, 128 heads, K = 2048)."""
    from experiments.bench_sections import sparse_mla_gather  # noqa: PLC0415 (benchmark code, not the library)
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (bf16(1, 4096, 128, 576), bf16(1, 8192, 576), jax.ShapeDtypeStruct((1, 4096, 2048), jnp.int32),
            bf16(1, 4096, 128, 512), f32(1, 4096, 128), bf16(1, 4096, 128, 512), f32(1, 4096, 128))
    for fields in sparse_mla_gather.BACKWARD_CONFIGS:
      f = functools.partial(kernel_bwd.sparse_mla_bwd, scale=0.135, v_dim=512,
                            **sparse_mla_gather.backward_arguments(fields))
      with jax.sharding.use_abstract_mesh(H200):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      self.assertIn("mosaic_gpu", text, msg=str(fields))


if __name__ == "__main__":
  absltest.main()
