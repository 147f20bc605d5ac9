"""Rotary position embedding with YaRN scaling (official `precompute_freqs_cis`, HF `_compute_yarn_parameters`).

Two layouts use the same frequencies (spec section 1, "the RoPE trap"):
  * MLA: interleaved pairs (2i, 2i+1), in the LAST qk_rope_head_dim dims of each head;
  * indexer: half split (dim i pairs with dim i + R/2), in the FIRST qk_rope_head_dim dims.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.model.config import RopeConfig


def yarn_inv_freq(cfg: RopeConfig, dim: int) -> np.ndarray:
  """Inverse frequencies [dim/2] (float32), blended between interpolation and extrapolation by YaRN's ramp."""
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  extrapolation = 1.0 / (np.float32(cfg.theta) ** exponents)
  if cfg.factor <= 1.0:
    return extrapolation.astype(np.float32)
  interpolation = extrapolation / np.float32(cfg.factor)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(cfg.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

  low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = 1.0 - ramp
  return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def rope_tables(cfg: RopeConfig, dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] -> (cos, sin) [B, T, dim/2] float32, scaled by YaRN's attention factor."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(yarn_inv_freq(cfg, dim))
  factor = cfg.attention_factor
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def _expand_heads(table: jax.Array, x: jax.Array) -> jax.Array:
  """[B, T, R/2] -> broadcastable against x [B, T, (heads...), R/2]."""
  return table.reshape(table.shape[:2] + (1,) * (x.ndim - 3) + table.shape[2:])


def apply_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """MLA layout: rotates pairs (x[2i], x[2i+1]); x [B, T, ..., R]; output stays interleaved."""
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  c, s = _expand_heads(cos, even), _expand_heads(sin, even)
  rotated = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def apply_half_split(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Indexer layout: rotates (x[i], x[i + R/2]); x [B, T, ..., R]."""
  half = x.shape[-1] // 2
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  c, s = _expand_heads(cos, first), _expand_heads(sin, first)
  return jnp.concatenate([first * c - second * s, second * c + first * s], axis=-1).astype(x.dtype)
