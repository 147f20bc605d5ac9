"""Building blocks shared by the model: parameters with logical axes, norms, the SwiGLU MLP, token chunks.

Every parameter carries `logical_axes` metadata (one name per dimension); `dsa_jax.sharding` maps
those names to mesh axes, so the model itself makes no device assumptions.

Long rows run the feed-forward layers over token chunks (`over_token_chunks`), each rematerialised in the
backward pass: at 128K tokens the dense MLP's [T, 18432] activations take 4.5 GiB each in bf16, and its
backward pass holds several of them. A chunk's widest activation takes about `TOKEN_CHUNK_BYTES`; the price
is one more forward pass of the chunked layer in the backward pass.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec


TOKEN_CHUNK_BYTES = 2**30
# Names (`jax.ad_checkpoint.checkpoint_name`) of the values a rematerialised layer keeps
# (`transformer.REMAT_POLICIES`): the outputs of chunked computations, whose chunks rematerialise themselves
# (recomputing the whole chunk loop to rebuild its output would run every chunk a third time), and the top-k
# selection (not differentiated, and costly to redo).
CHUNKED_OUTPUT, TOPK_INDICES = "chunked_output", "topk_indices"
# Kept by every policy and by the query chunks of `mla`: the attention's log-sum-exp, 4 bytes per query and head.
# Where nothing differentiates the attention (the dense warm-up trains only the indexer, whose KL target reads
# the lse), keeping it lets the backward pass skip the attention forward that produced it.
ATTENTION_LSE = "attention_lse"


def token_chunk(width: int, dtype) -> int:
  """Tokens per chunk (a power of two) whose [chunk, width] activation of `dtype` takes about TOKEN_CHUNK_BYTES."""
  tokens = max(TOKEN_CHUNK_BYTES // (width * jnp.dtype(dtype).itemsize), 1)
  return 1 << (tokens.bit_length() - 1)


def over_token_chunks(fn: Callable, xs, chunk: int):
  """fn(pytree of [c, ...] token arrays) -> pytree of [c, ...], run `chunk` tokens at a time under
  `jax.checkpoint` (one piece when the tokens fit one chunk). The token axis is zero-padded to a multiple of
  `chunk`; the padding rows' outputs are dropped."""
  m = jax.tree.leaves(xs)[0].shape[0]
  if chunk >= m:
    return fn(xs)
  pad = -m % chunk
  split = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])
  out = jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, xs))
  return jax.tree.map(lambda y: checkpoint_name(y.reshape(-1, *y.shape[2:])[:m], CHUNKED_OUTPUT), out)


class RouterBias(nnx.Variable):
  """MoE `e_score_correction_bias`: state updated by the aux-loss-free rule, not by gradients."""


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Sharding hint for an activation by logical axis names (`jax.lax.with_sharding_constraint`).

  The names resolve through flax's `logical_axis_rules`, which `dsa_jax.sharding.rules.activate` sets
  together with the mesh; without both this is the identity, so the model runs unchanged on one device.
  """
  rules = dict(spmd.get_logical_axis_rules())
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*(rules.get(a) for a in axes)))


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: str, std: float) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


def ones_param(shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (official `RMSNorm`, HF `DeepseekV32RMSNorm`)."""

  def __init__(self, dim: int, axis_name: str, *, eps: float, param_dtype: str):
    self.weight = ones_param((dim,), (axis_name,), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias in float32 (the indexer's `k_norm`)."""

  def __init__(self, dim: int, axis_name: str, *, eps: float, param_dtype: str):
    self.weight = ones_param((dim,), (axis_name,), param_dtype)
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); dense layers and shared experts."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: str, param_dtype: str, std: float):
    self.gate = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype, std)
    self.up = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype, std)
    self.down = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype, std)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D], over token chunks on long rows (module docstring)."""
    b, t, d = x.shape
    weights = tuple(w[...].astype(self.dtype) for w in (self.gate, self.up, self.down))
    chunk = token_chunk(weights[0].shape[1], self.dtype)
    return over_token_chunks(lambda tokens: _swiglu(tokens, weights), x.astype(self.dtype).reshape(b * t, d),
                             chunk).reshape(b, t, d)


def _swiglu(x: jax.Array, weights: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
  gate, up, down = weights
  h = jax.nn.silu(jnp.einsum("md,df->mf", x, gate)) * jnp.einsum("md,df->mf", x, up)
  return jnp.einsum("mf,fd->md", h, down)
