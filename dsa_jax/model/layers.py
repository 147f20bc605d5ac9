"""Building blocks shared by the model: parameters with logical axes, norms, the SwiGLU MLP.

Every parameter carries `logical_axes` metadata (one name per dimension); `dsa_jax.sharding` maps
those names to mesh axes, so the model itself makes no device assumptions.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec


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
    x = x.astype(self.dtype)
    gate = jnp.einsum("btd,df->btf", x, self.gate[...].astype(self.dtype))
    up = jnp.einsum("btd,df->btf", x, self.up[...].astype(self.dtype))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.down[...].astype(self.dtype))
