"""The row-blocked XLA sparse MLA (`chunked.py`) against the unblocked reference: bitwise the same out and lse,
gradients (of out and of lse) equal up to rounding, for blocks that do not divide T, -1 entries, a query with no
valid key and keys selected by many queries; and `api.sparse_mla(implementation="xla")` runs it."""

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

from pallas_kernels.sparse_mla import api, chunked, reference


def _inputs(seed, B, T, N, S, K, C=16, R=8, dtype=jnp.float32):  # noqa: N803
  """Causal indices (-1 past each query's own position, so early queries see fewer than K keys), query 2 with
  none valid, and key 0 selected by every query."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, N, C + R), jnp.float32).astype(dtype)
  kv = jax.random.normal(ks[1], (B, S, C + R), jnp.float32).astype(dtype)
  idx = jax.random.randint(ks[2], (B, T, K), 0, S)
  idx = jnp.where(idx <= jnp.arange(T)[None, :, None], idx, -1)
  idx = idx.at[:, :, 0].set(0).at[:, 2, :].set(-1)
  return q, kv, idx


def _vjp(fn, q, kv, seed):
  (out, lse), vjp = jax.vjp(jax.jit(fn), q, kv)
  ks = jax.random.split(jax.random.key(seed))
  do = jax.random.normal(ks[0], out.shape).astype(out.dtype)
  dlse = jnp.where(jnp.isfinite(lse), jax.random.normal(ks[1], lse.shape), 0.0)
  return (out, lse), vjp((do, dlse))


class ChunkedSparseMlaTest(parameterized.TestCase):

  @parameterized.named_parameters(("one_row_f32", 1, jnp.float32), ("ragged_f32", 3, jnp.float32),
                                  ("divides_f32", 4, jnp.float32), ("ragged_bf16", 3, jnp.bfloat16),
                                  ("longer_than_t_bf16", 64, jnp.bfloat16))
  def test_matches_reference(self, rows_per_block, dtype):
    q, kv, idx = _inputs(0, 2, 12, 4, 40, 16, dtype=dtype)
    unblocked = lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.2, v_dim=16)
    blocked = lambda q, kv: chunked.sparse_mla(q, kv, idx, scale=0.2, v_dim=16, rows_per_block=rows_per_block)
    want, want_grads = _vjp(unblocked, q, kv, 1)
    got, got_grads = _vjp(blocked, q, kv, 1)
    chex.assert_trees_all_equal(got, want)
    self.assertTrue(bool(jnp.all(jnp.isneginf(got[1][:, 2]))))
    chex.assert_trees_all_equal_shapes_and_dtypes(got_grads, (q, kv))
    f32 = lambda x: x.astype(jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, w in zip(got_grads, want_grads):
      chex.assert_trees_all_close(f32(g), f32(w), atol=tol * float(jnp.max(jnp.abs(f32(w)))), rtol=tol)

  def test_api_xla_path_is_chunked(self):
    q, kv, idx = _inputs(2, 1, 9, 2, 20, 8)
    fn = lambda q, kv: api.sparse_mla(q, kv, idx, scale=0.3, v_dim=16, implementation="xla")
    self.assertIn("custom_vjp_call", str(jax.make_jaxpr(fn)(q, kv)))
    want, want_grads = _vjp(lambda q, kv: reference.sparse_mla(q, kv, idx, scale=0.3, v_dim=16), q, kv, 3)
    got, got_grads = _vjp(fn, q, kv, 3)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-5, rtol=1e-5)

  def test_default_block_bounds_the_temporaries(self):
    q = jax.ShapeDtypeStruct((1, 131072, 128, 576), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 131072, 576), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((1, 131072, 2048), jnp.int32)
    rows = chunked.default_rows_per_block(q, kv, idx)
    per_row = 2048 * (576 * 6 + 16 * 128)
    self.assertLessEqual(rows * per_row, chunked.BLOCK_BYTES)
    self.assertGreater((rows + 1) * per_row, chunked.BLOCK_BYTES)


if __name__ == "__main__":
  absltest.main()
