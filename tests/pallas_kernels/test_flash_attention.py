"""Dense flash attention: each implementation against the reference (values, lse, dq / dk / dv with and without an
lse cotangent) in MHA and MQA layouts with packed documents, rows that see nothing, decode-like T != S and blocks
that do not divide T; the chunked path's compile-time memory at T = 32K; the cuDNN path's argument preparation
and fallback rules on CPU and its lowering for an H200 at 128K (cuDNN itself runs only on a GPU)."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax._src.cudnn import fused_attention_stablehlo as jax_cudnn  # private: patched for cross-lowering

from pallas_kernels.flash_attention import api, chunked, cudnn, reference
from tests.pallas_kernels.mosaic_checks import H200

UNWRITTEN = np.iinfo(np.int32).max
LAYOUTS = ("causal", "packed", "unseen", "chunk", "decode")


def _layout(kind: str) -> tuple[int, dict]:
  """(T, positions and segment ids) of a batch of 2 rows, S = 37 keys.

  causal: one document. packed: 2 and 3 documents with positions restarting. unseen: keys 4 positions ahead of
  the queries, so the first 4 queries see nothing. chunk: the last 12 tokens of one document as queries (a query
  chunk of `dsa_jax.model.mla`). decode: 5 queries against a 37-slot cache with left padding
  (segment -1) and unwritten slots (int32-max positions), as `dsa_jax.model.kv_cache` lays it out.
  """
  s = 37
  arange = np.arange(s)
  if kind == "causal":
    pos, seg = np.stack([arange, arange]), np.zeros((2, s))
    return s, dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  if kind == "packed":
    pos = np.stack([np.r_[np.arange(15), np.arange(22)], np.r_[np.arange(10), np.arange(10), np.arange(17)]])
    seg = np.stack([np.r_[[1] * 15, [2] * 22], np.r_[[0] * 10, [1] * 10, [2] * 17]])
    return s, dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  if kind == "unseen":
    pos, seg = np.stack([arange, arange]), np.zeros((2, s))
    return s, dict(q_positions=pos, kv_positions=pos + 4, q_segment_ids=seg, kv_segment_ids=seg)
  if kind == "chunk":
    pos, seg = np.stack([arange, arange]), np.zeros((2, s))
    return 12, dict(q_positions=pos[:, -12:], kv_positions=pos, q_segment_ids=seg[:, -12:], kv_segment_ids=seg)
  kv_pos, kv_seg, q_pos = np.full((2, s), UNWRITTEN), np.full((2, s), -1), []
  for row, pad in enumerate((3, 0)):
    written = 25 - pad  # prompt and the 5 new tokens, after `pad` padding slots
    kv_pos[row, :pad], kv_pos[row, pad:pad + written] = np.arange(pad), np.arange(written)
    kv_seg[row, pad:pad + written] = 0
    q_pos.append(np.arange(written - 5, written))
  t = 5
  return t, dict(q_positions=np.stack(q_pos), kv_positions=kv_pos, q_segment_ids=np.zeros((2, t)),
                 kv_segment_ids=kv_seg)


def make_inputs(kind: str, shared: bool, dtype, hk=24, hv=16, n=3):
  t, layout = _layout(kind)
  s = layout["kv_positions"].shape[1]
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, t, n, hk), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (2, s, hk) if shared else (2, s, n, hk), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (2, s, hv) if shared else (2, s, n, hv), jnp.float32).astype(dtype)
  return (q, k, v), {name: jnp.asarray(x, jnp.int32) for name, x in layout.items()}


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


@absltest.skipThisClass("The contract; its subclasses name the implementation.")
class FlashAttentionContract(parameterized.TestCase):
  """The contract every implementation meets; subclasses name the implementation and the dtype."""
  implementation: str
  dtype = jnp.float32
  tolerance = 1e-5

  def attention(self, q, k, v, layout):
    return api.flash_attention(q, k, v, **layout, scale=0.3, implementation=self.implementation, block_q=8,
                               block_k=16)

  def reference(self, q, k, v, layout):
    f32 = lambda x: x.astype(jnp.float32)
    return reference.attention(f32(q), f32(k), f32(v), **layout, scale=0.3)

  def assert_close(self, got, want):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    chex.assert_trees_all_close(got, want, atol=self.tolerance * max(1.0, float(jnp.max(jnp.abs(want)))),
                                rtol=self.tolerance)

  @parameterized.product(kind=LAYOUTS, shared=(False, True))
  def test_matches_reference(self, kind, shared):
    (q, k, v), layout = make_inputs(kind, shared, self.dtype)
    out, lse = self.attention(q, k, v, layout)
    want_out, want_lse = self.reference(q, k, v, layout)
    chex.assert_shape(out, want_out.shape)
    self.assertEqual(out.dtype, q.dtype)
    self.assert_close(out, want_out)
    chex.assert_trees_all_equal(jnp.isneginf(lse), jnp.isneginf(want_lse))
    self.assert_close(_finite(lse), _finite(want_lse))
    if kind == "unseen":
      self.assertTrue(bool(jnp.all(jnp.isneginf(lse[:, :4]))) and bool(jnp.all(out[:, :4] == 0)))

  @parameterized.product(kind=LAYOUTS, shared=(False, True), lse_cotangent=(False, True))
  def test_gradients_match_reference(self, kind, shared, lse_cotangent):
    """Without an lse cotangent the lse output is unused (a symbolic zero); with one it is random on the rows
    that see something."""
    (q, k, v), layout = make_inputs(kind, shared, self.dtype)
    keys = jax.random.split(jax.random.key(1), 2)
    _, want_lse = self.reference(q, k, v, layout)
    dlse = jnp.where(jnp.isfinite(want_lse), jax.random.normal(keys[1], want_lse.shape), 0.0)

    def loss(attention):
      def f(q, k, v):
        out, lse = attention(q, k, v, layout)
        total = jnp.sum(jnp.sin(out.astype(jnp.float32)))
        return total + jnp.sum(_finite(lse) * dlse) if lse_cotangent else total
      return f

    f32 = lambda x: x.astype(jnp.float32)
    got = jax.grad(loss(self.attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(self.reference), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
    chex.assert_trees_all_equal_shapes_and_dtypes(got, (q, k, v))
    for g, w in zip(got, want):
      self.assert_close(g, w)


class XlaTest(FlashAttentionContract):
  implementation = "xla"

  @parameterized.parameters(False, True)
  def test_forward_and_backward_memory_at_32k(self, shared):
    """Compiled chunked forward + backward at T = S = 32K, 2 heads of 16 dims, default 512-blocks: XLA's temporary
    bytes stay under 1/64 of one float32 [T, S] array (4 GiB; measured ~13 MiB)."""
    b, t, n, h = 1, 32768, 2, 16
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, h) if shared else (b, t, n, h), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def value_and_grads(q, k, v, pos, seg):
      def loss(q, k, v):
        out, lse = chunked.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                     kv_segment_ids=seg, scale=0.25)
        return jnp.sum(out) + jnp.sum(_finite(lse))
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    memory = jax.jit(value_and_grads).lower(q, k, k, ids, ids).compile().memory_analysis()
    self.assertLess(memory.temp_size_in_bytes, t * t * 4 // 64)

  def test_none_runs_chunked_off_gpu(self):
    (q, k, v), layout = make_inputs("packed", False, jnp.bfloat16)
    got = api.flash_attention(q, k, v, **layout, scale=0.3)
    want = chunked.attention(q, k, v, **layout, scale=0.3)
    chex.assert_trees_all_equal(got, want)


class CudnnTest(FlashAttentionContract):
  """cuDNN on a GPU (bf16); inputs it does not take are skipped, and layouts it cannot mask run the chunked
  fallback inside the same call."""
  implementation = "cudnn"
  dtype = jnp.bfloat16
  tolerance = 3e-2

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "gpu":
      self.skipTest(f"cuDNN attention runs only on a GPU; this backend is {jax.default_backend()!r}.")

  def attention(self, q, k, v, layout):
    reason = cudnn.unsupported(q, k, v)
    if reason:
      self.skipTest(f"cuDNN does not take these inputs: {reason}.")
    return super().attention(q, k, v, layout)


class CudnnPreparationTest(parameterized.TestCase):
  """What the cuDNN path decides and prepares, checked on CPU."""

  def test_unsupported_names_the_reason(self):
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    self.assertIsNone(cudnn.unsupported(bf16(1, 64, 128, 192), bf16(1, 64, 128, 192), bf16(1, 64, 128, 128)))
    self.assertIn("head dims 576 / 512", cudnn.unsupported(bf16(1, 64, 128, 576), bf16(1, 64, 576), bf16(1, 64, 512)))
    self.assertIsNone(cudnn.unsupported(bf16(1, 8, 4, 64), bf16(1, 64, 4, 64), bf16(1, 64, 4, 64)))  # last 8 keys
    self.assertIn("T=64 > S=8", cudnn.unsupported(bf16(1, 64, 4, 64), bf16(1, 8, 4, 64), bf16(1, 8, 4, 64)))
    f32 = jax.ShapeDtypeStruct((1, 64, 4, 64), jnp.float32)
    self.assertIn("float32", cudnn.unsupported(f32, f32, f32))

  def test_explicit_cudnn_rejects_mqa_head_dims(self):
    q, kv = jnp.zeros((1, 8, 2, 576), jnp.bfloat16), jnp.zeros((1, 8, 576), jnp.bfloat16)
    ids = jnp.zeros((1, 8), jnp.int32)
    with self.assertRaisesRegex(ValueError, "implementation='cudnn' cannot run"):
      api.flash_attention(q, kv, kv[..., :512], q_positions=ids, kv_positions=ids, q_segment_ids=ids,
                          kv_segment_ids=ids, scale=0.1, implementation="cudnn")

  def _ok(self, pos, seg, kv_pos=None, kv_seg=None, max_segments=cudnn.DEFAULT_MAX_SEGMENTS):
    as_ids = lambda x: jnp.asarray(np.atleast_2d(x), jnp.int32)
    kv_pos = pos if kv_pos is None else kv_pos
    kv_seg = seg if kv_seg is None else kv_seg
    return bool(cudnn.layout_ok(as_ids(pos), as_ids(kv_pos), as_ids(seg), as_ids(kv_seg), max_segments))

  def test_layout_ok_accepts_documents_in_order(self):
    _, packed = _layout("packed")
    self.assertTrue(self._ok(packed["q_positions"], packed["q_segment_ids"], max_segments=64))
    self.assertTrue(self._ok(np.arange(8), np.zeros(8)))
    self.assertTrue(self._ok(np.r_[0, 2, 5, 0, 1], np.r_[3, 3, 3, 1, 1], max_segments=2))  # gaps in positions

  def test_layout_ok_default_takes_one_document_a_row(self):
    """cuDNN's packed backward keeps a dq accumulator per packed sequence, so by default only one-document rows
    take the cuDNN path (`cudnn.DEFAULT_MAX_SEGMENTS`)."""
    self.assertEqual(cudnn.DEFAULT_MAX_SEGMENTS, 1)
    self.assertFalse(self._ok(np.r_[0, 1, 0, 1], np.r_[0, 0, 1, 1]))

  @parameterized.named_parameters(
      ("keys_are_not_the_queries", np.arange(8), np.zeros(8), np.arange(8) + 1, None),
      ("other_key_segments", np.arange(8), np.zeros(8), None, np.ones(8)),
      ("context_parallel_order", np.r_[0:4, 12:16, 4:8, 8:12], np.zeros(16), None, None),  # 2 shards, zig-zag
      ("segment_id_in_two_runs", np.r_[0, 1, 0, 1, 2, 3], np.r_[0, 0, 1, 1, 0, 0], None, None),
      ("positions_restart_inside_a_run", np.r_[0, 1, 0, 1], np.zeros(4), None, None))
  def test_layout_ok_rejects(self, pos, seg, kv_pos, kv_seg):
    self.assertFalse(self._ok(pos, seg, kv_pos, kv_seg))

  def test_layout_ok_rejects_more_runs_than_max_segments(self):
    pos, seg = np.r_[0, 1, 0, 1, 0], np.r_[0, 0, 1, 1, 2]
    self.assertTrue(self._ok(pos, seg, max_segments=3))
    self.assertFalse(self._ok(pos, seg, max_segments=2))
    self.assertFalse(bool(cudnn.layout_ok(*(jnp.zeros((1, n), jnp.int32) for n in (4, 6, 4, 6)))))  # not a tail

  def test_layout_ok_takes_the_last_keys_of_one_document(self):
    """A chunk of queries with the keys up to its last query (T < S): one document, the queries its last T."""
    pos, seg = np.arange(8), np.zeros(8)
    self.assertTrue(self._ok(pos[5:], seg[5:], pos, seg))
    self.assertFalse(self._ok(pos[4:7], seg[4:7], pos, seg))  # not the last keys
    self.assertFalse(self._ok(pos[5:], seg[5:], pos[::-1], seg))  # keys out of order
    two_docs = np.r_[0, 0, 0, 1, 1, 1, 1, 1]
    self.assertFalse(self._ok(np.r_[0:5][2:], two_docs[5:], np.r_[0:3, 0:5], two_docs, max_segments=64))

  @parameterized.parameters(0.0, 1.0)
  def test_last_keys_split_matches_reference(self, dlse_scale):
    """T < S runs as two cuDNN calls (causal over the last T keys, all keys with the last T as padding) merged by
    lse, and each call's backward gets the merged output and lse. Checked on CPU with the calls replaced by the reference and
    the chunked backward at the masks cuDNN applies; the lse cotangent's case runs the chunked path (`api`)."""
    t, s, b, n = 12, 40, 2, 3
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, t, n, 16))
    k, v = jax.random.normal(ks[1], (b, s, n, 16)), jax.random.normal(ks[2], (b, s, n, 8))
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    seg = jnp.zeros((b, s), jnp.int32)
    layout = dict(q_positions=pos[:, s - t:], kv_positions=pos, q_segment_ids=seg[:, s - t:], kv_segment_ids=seg)

    def masks(q, k, mask_type, kv_length):  # positions that make visibility cuDNN's index or padding mask
      tq, sk = q.shape[1], k.shape[1]
      causal = mask_type == jax_cudnn.MaskType.CAUSAL
      self.assertEqual((causal, kv_length is None), (True, True) if causal else (False, False))
      self.assertTrue(tq == sk or not causal)
      qp = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32) if causal else jnp.full(tq, kv_length - 1), (b, tq))
      # garbage in the padded keys' gradients must not reach the result (cuDNN leaves them unspecified)
      return dict(q_positions=qp, kv_positions=jnp.broadcast_to(jnp.arange(sk, dtype=jnp.int32), (b, sk)),
                  q_segment_ids=jnp.zeros((b, tq), jnp.int32), kv_segment_ids=jnp.zeros((b, sk), jnp.int32))

    def forward_call(q, k, v, segment_ids, scale, max_segments, mask_type, kv_length=None):
      return reference.attention(q, k, v, **masks(q, k, mask_type, kv_length), scale=scale)

    def backward_call(q, k, v, segment_ids, out, lse, dout, scale, max_segments, mask_type, kv_length=None):
      m = masks(q, k, mask_type, kv_length)
      grads = chunked.backward(q, k, v, m["q_positions"], m["kv_positions"], m["q_segment_ids"],
                               m["kv_segment_ids"], out, lse, dout, jnp.zeros_like(lse), scale=scale, block_q=8,
                               block_k=8)
      if kv_length is None:
        return grads
      garbage = lambda x: x.at[:, kv_length:].set(1e3)
      return grads[0], garbage(grads[1]), garbage(grads[2])

    def loss(attend, q, k, v):
      out, lse = attend(q, k, v)
      return jnp.sum(out * jnp.arange(8)) + dlse_scale * jnp.sum(lse)

    split = lambda q, k, v: api.flash_attention(q, k, v, **layout, scale=0.3, implementation="cudnn", block_q=8,
                                                block_k=8)
    ref = lambda q, k, v: reference.attention(q, k, v, **layout, scale=0.3)
    with mock.patch.multiple(cudnn, unsupported=lambda *args: None, _forward_call=forward_call,
                             _backward_call=backward_call):
      self.assertTrue(bool(cudnn.layout_ok(*layout.values())))
      got = jax.jit(split)(q, k, v), jax.jit(jax.grad(lambda *a: loss(split, *a), argnums=(0, 1, 2)))(q, k, v)
    want = ref(q, k, v), jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)

  def test_packing(self):
    seg = jnp.asarray([[7, 7, 7, 2, 2, 9], [4, 4, 4, 4, 4, 4]], jnp.int32)
    seqlen, offsets, run, start = cudnn.packing(seg, max_segments=4)
    np.testing.assert_array_equal(seqlen, [[3, 2, 1, 0], [6, 0, 0, 0]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, 6, 6, 6, -1]])
    np.testing.assert_array_equal(run, [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(start, [[0, 0, 0, 3, 3, 5], [0, 0, 0, 0, 0, 0]])

  def test_statistics_layout(self):
    """Token t of row b, in run r starting at index s0, reads cuDNN's statistics at [b * M + r, n, t - s0]."""
    seg = jnp.asarray([[7, 7, 7, 2, 2, 9], [4, 4, 4, 4, 4, 4]], jnp.int32)
    _, _, run, start = cudnn.packing(seg, max_segments=4)
    lse = jax.random.normal(jax.random.key(0), (2, 6, 3))
    stats = cudnn.stats_from_lse(lse, run, start, max_segments=4)
    chex.assert_shape(stats, (8, 3, 6))
    self.assertEqual(float(stats[0 * 4 + 1, 2, 4 - 3]), float(lse[0, 4, 2]))
    self.assertEqual(float(stats[1 * 4 + 0, 1, 5]), float(lse[1, 5, 1]))
    self.assertEqual(int(jnp.sum(stats != 0)), lse.size)
    chex.assert_trees_all_equal(cudnn.lse_from_stats(stats, run, start, max_segments=4), lse)

  def test_cudnn_path_routing(self):
    """Which branch the "cudnn" implementation runs, on CPU with cuDNN's forward and backward replaced by marked
    stand-ins: its forward where `layout_ok` holds, its backward unless the lse cotangent is nonzero, the
    chunked path otherwise."""
    (q, k, v), causal = make_inputs("causal", False, jnp.float32)
    _, unseen = make_inputs("unseen", False, jnp.float32)
    true_forward = lambda q, k, v, segment_ids, **kw: reference.attention(
        q, k, v, q_positions=causal["q_positions"], kv_positions=causal["kv_positions"],
        q_segment_ids=segment_ids, kv_segment_ids=segment_ids, scale=0.3)
    zero_forward = lambda q, *args, **kw: (jnp.zeros(q.shape[:3] + (16,)), jnp.zeros(q.shape[:3]))
    ones_backward = lambda q, k, v, *args, **kw: (jnp.ones_like(q), jnp.ones_like(k), jnp.ones_like(v))
    attention = lambda layout: lambda q, k, v: api.flash_attention(q, k, v, **layout, scale=0.3,
                                                                   implementation="cudnn", block_q=8, block_k=16)
    with mock.patch.multiple(cudnn, unsupported=lambda *args: None, forward=zero_forward):
      self.assertEqual(float(jnp.abs(jax.jit(attention(causal))(q, k, v)[0]).max()), 0.0)
      chex.assert_trees_all_close(jax.jit(attention(unseen))(q, k, v),
                                  reference.attention(q, k, v, **unseen, scale=0.3), atol=1e-5)
    with mock.patch.multiple(cudnn, unsupported=lambda *args: None, forward=true_forward, backward=ones_backward):
      for layout, dlse_scale, cudnn_backward in ((causal, None, True), (causal, 0.0, True), (causal, 1.0, False),
                                                 (unseen, None, False)):
        def loss(attend, q, k, v, layout=layout, dlse_scale=dlse_scale):
          out, lse = attend(q, k, v)
          return jnp.sum(out) + (0.0 if dlse_scale is None else dlse_scale * jnp.sum(_finite(lse)))
        got = jax.jit(jax.grad(lambda *a: loss(attention(layout), *a), argnums=(0, 1, 2)))(q, k, v)
        if cudnn_backward:
          chex.assert_trees_all_equal(got, tuple(jnp.ones_like(x) for x in (q, k, v)))
        else:
          ref = lambda q, k, v, layout=layout: reference.attention(q, k, v, **layout, scale=0.3)
          chex.assert_trees_all_close(got, jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v),
                                      atol=1e-4)

  @parameterized.parameters((False, 131072), (True, 131072), (False, 16384))
  def test_cudnn_path_lowers_for_h200_at_128k(self, lse_cotangent, t):
    """Forward + backward of MLA's MHA mode (128 heads, 192 / 128, bf16) over 128K keys lower for CUDA with
    cuDNN's forward and backward calls: T = S, and a chunk of the last 16K queries (two calls each way; jax
    checks the local backend's compute capability and cuDNN version at trace time; a CPU has neither, so those
    checks are patched to an H200's)."""
    s = 131072
    q = jax.ShapeDtypeStruct((1, t, 128, 192), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, s, 128, 192), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, s, 128, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def loss(q, k, v, pos, seg):
      out, lse = api.flash_attention(q, k, v, q_positions=pos[:, s - t:], kv_positions=pos,
                                     q_segment_ids=seg[:, s - t:], kv_segment_ids=seg, scale=192**-0.5,
                                     implementation="cudnn")
      return jnp.sum(out.astype(jnp.float32)) + (jnp.sum(lse) if lse_cotangent else 0.0)

    with (mock.patch.object(jax_cudnn, "check_compute_capability", lambda capability: True),
          mock.patch.object(jax_cudnn, "check_cudnn_version", lambda: 91900), jax.sharding.use_abstract_mesh(H200)):
      text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v, ids, ids).lower(
          lowering_platforms=("cuda",)).as_text()
    calls = 1 if t == s else 2
    self.assertEqual(text.count("custom_call @__cudnn$fmhaSoftmax("), calls)
    self.assertEqual(text.count("custom_call @__cudnn$fmhaSoftmaxBackward("), calls)
    self.assertIn(f"tensor<{cudnn.DEFAULT_MAX_SEGMENTS}x128x{t}xf32>", text)  # the statistics
    self.assertNotIn(f"tensor<1x{s - t}x128x", text)  # a chunk's keys before its queries are never copied out


if __name__ == "__main__":
  absltest.main()
