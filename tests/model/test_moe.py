"""The feed-forward layers over token chunks (routed experts, SwiGLU MLP) equal one piece, in value and
gradients."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dsa_jax.model import layers, moe


@pytest.mark.parametrize("chunk", [8, 12, 64])  # several chunks; chunks with padding; one chunk
def test_chunked_routed_experts_equal_the_unchunked_ones(chunk):
  m, d, f, e, k = 40, 16, 8, 4, 2
  keys = jax.random.split(jax.random.key(0), 5)
  tokens = jax.random.normal(keys[0], (m, d))
  experts = jnp.argsort(jax.random.uniform(keys[1], (m, e)), axis=-1)[:, :k].astype(jnp.int32)  # distinct per token
  gates = jax.random.uniform(keys[2], (m, k))
  weights = (0.3 * jax.random.normal(keys[3], (e, d, f)), 0.3 * jax.random.normal(keys[4], (e, d, f)),
             0.3 * jax.random.normal(keys[0], (e, f, d)))

  def loss(fn, tokens, gates, weights):
    return jnp.sum(jnp.sin(fn(tokens, experts, gates, weights, "xla")))

  plain = jax.value_and_grad(lambda *a: loss(moe.routed_experts, *a), argnums=(0, 1, 2))(tokens, gates, weights)
  chunked_fn = lambda t, x, g, w, i: moe.chunked_routed_experts(t, x, g, w, i, chunk)
  chunked = jax.jit(jax.value_and_grad(lambda *a: loss(chunked_fn, *a), argnums=(0, 1, 2)))(tokens, gates, weights)
  chex.assert_trees_all_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_token_chunks_of_v3_2_shapes():
  assert layers.token_chunk(8 * 7168, jnp.bfloat16) == 8192  # the MoE's sorted copies [8192 x 8, 7168] bf16: 1 GiB
  assert layers.token_chunk(18432, jnp.bfloat16) == 16384  # the dense MLP's [16384, 18432] bf16: under 1 GiB
  assert layers.token_chunk(2 * 64, jnp.float32) == 2**21


@pytest.mark.parametrize("chunk", [8, 12])
def test_mlp_over_token_chunks_equals_one_piece(chunk, monkeypatch):
  mlp = layers.MLP(16, 24, rngs=nnx.Rngs(0), dtype="float32", param_dtype="float32", std=0.3)
  x = jax.random.normal(jax.random.key(1), (2, 20, 16))
  graph, state = nnx.split(mlp)
  run = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graph, state)(x)))
  whole = jax.value_and_grad(run, argnums=(0, 1))(state, x)
  monkeypatch.setattr(layers, "token_chunk", lambda width, dtype: chunk)
  chunked = jax.jit(jax.value_and_grad(run, argnums=(0, 1)))(state, x)
  chex.assert_trees_all_close(chunked, whole, rtol=1e-5, atol=1e-6)
