"""FP8 numerics of the official lightning indexer (spec section 1; official `act_quant`, `rotate_activation`).

After RoPE, q and k are rotated by an orthonormal Hadamard transform and quantised to float8 e4m3 per
block with a power-of-two (ue8m0) scale. Because the scale is a power of two, dequantising (value x scale)
is exact in float32, so feeding the dequantised tensors to the ordinary fp32-accumulating scorer
reproduces the official fp8 dot products bit for bit up to summation order.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lightning_indexer.reference import quantize_e4m3  # the spec of the fp8 scores kernel


def hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Sylvester-ordered Hadamard matrix [n, n] (the order `fast_hadamard_transform` uses)."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard size n={n} is invalid; allowed: a power of two.")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(np.float32(n))


def rotate(x: jax.Array) -> jax.Array:
  """Hadamard rotation of the last dimension (official `rotate_activation`)."""
  return jnp.einsum("...h,hg->...g", x.astype(jnp.float32), jnp.asarray(hadamard_matrix(x.shape[-1])))


def fake_quantize_e4m3(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """(fp8 values as float32 [..., H], scales [..., H/block]): what the fp8 kernel multiplies."""
  values, scale = quantize_e4m3(x, block)
  return values.astype(jnp.float32), scale
