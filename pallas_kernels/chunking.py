"""Splitting [B, L, ...] arrays into chunks for the chunked XLA loops (indexer KL, indexer top-k, sparse MLA)."""

import jax
import jax.numpy as jnp


def pad_chunks(x: jax.Array, chunk: int, value=0) -> jax.Array:
  """[B, L, ...] -> [L_pad // chunk, B, chunk, ...] (chunk-major, for lax.map / lax.scan)."""
  pad = -x.shape[1] % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)


def unchunk(x: jax.Array, length: int) -> jax.Array:
  """[L_pad // chunk, B, chunk, ...] -> [B, length, ...]: the inverse of `pad_chunks`."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :length]
