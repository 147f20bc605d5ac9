"""Determinism on the GPU: the options documented as deterministic give bitwise-identical results across two runs
(two separate compilations and executions): sparse MLA and the dense indexer KL with `deterministic=True` (forward
kernels and a fixed-order XLA backward), and the discrete selections of `topk_indices` and `index_topk`. Shapes
where many queries hit the same keys, so that atomic accumulation orders would show."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.indexer_kl import api as kl_api
from pallas_kernels.lightning_indexer import api as indexer_api
from pallas_kernels.sparse_mla import api as sparse_api
from pallas_kernels.topk import api as topk_api
from tests.gpu.test_indexer_kl import bf16, production_inputs
from tests.gpu.test_lightning_indexer import integer_inputs, packed
from tests.gpu.test_sparse_mla import causal_indices


def assert_twice_identical(fn, *args):
  """Two fresh jits of fn (nothing cached between them) give bitwise-equal outputs."""
  first, second = (jax.jit(lambda *a: fn(*a))(*args) for _ in range(2))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    bits = lambda x: np.atleast_1d(np.asarray(x)).view(np.uint8)
    np.testing.assert_array_equal(bits(a), bits(b))


def test_sparse_mla_deterministic():
  """4096 queries x 128 heads over 4096 keys, K = 2048: every key gathers gradient from ~1000 queries."""
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, 4096, 128, 576), jnp.bfloat16)
  kv = jax.random.normal(ks[1], (1, 4096, 576), jnp.bfloat16)
  idx = causal_indices(1, 4096, 2048)
  do = jax.random.normal(ks[2], (1, 4096, 128, 512), jnp.bfloat16)

  def fn(q, kv, do):
    (out, lse), vjp = jax.vjp(lambda q, kv: sparse_api.sparse_mla(q, kv, idx, scale=0.135, v_dim=512,
                                                                  deterministic=True), q, kv)
    return out, lse, vjp((do, jnp.zeros_like(lse)))

  assert_twice_identical(fn, q, kv, do)


def test_dense_indexer_kl_deterministic():
  (attn_q, attn_k, lse, scale), (iq, ik, iw), vis = production_inputs(0, 4096, 3000)
  fn = lambda i: jax.value_and_grad(lambda i: kl_api.dense_kl(*bf16((attn_q, attn_k)), lse, scale, *i, **vis,
                                                               deterministic=True).sum())(i)
  assert_twice_identical(fn, (*bf16((iq, ik)), iw))


def test_selections():
  vis = packed((20000, 12768))
  q, k, w = integer_inputs(2, 1, 32768, 32768, 64, 128)
  assert_twice_identical(lambda q, k, w: indexer_api.index_topk(q, k, w, topk=2048, **vis), q, k, w)
  scores = jax.random.normal(jax.random.key(3), (1024, 131072), jnp.float32)
  assert_twice_identical(lambda s: topk_api.topk_indices(s, 2048), scores)
