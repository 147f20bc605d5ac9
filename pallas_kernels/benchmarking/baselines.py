"""Baselines every kernel is judged against (GPU machine): peak HBM bandwidth, XLA matmul rate, cuDNN dense MLA,
lax.top_k.

Figures and caveats measured so far are in `shared/docs/pallas_gpu_notes.md` ("Baselines that a kernel must
beat"). Each function builds its inputs from fresh random data (never zeros, see the device METHOD notes),
consumes its outputs and returns the median over repeats from `timing.time_fn`.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.benchmarking import timing


PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, vendor figures (SXM)


def peak_hbm() -> float | None:
  """The vendor's peak HBM bandwidth of device 0 in bytes/s (None for a device not in PEAK_HBM)."""
  kind = jax.devices()[0].device_kind
  return next((bw for name, bw in PEAK_HBM.items() if name in kind), None)


@functools.cache
def matmul_tflops(n: int = 8192) -> float:
  """XLA bf16 [n, n] x [n, n] matmul rate in TFLOP/s: the ceiling that turns FLOP counts into floors."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  return timing.tflops(2.0 * n**3, timing.time_fn(matmul, a, b, iters=10))


def cudnn_dense_mla_layer_seconds(T: int, heads: int = 128, dqk: int = 192, dv: int = 128) -> float:  # noqa: N803
  """Forward seconds of one dense causal MLA attention layer (MHA mode) through cuDNN, batch 1.

  The public `jax.nn.dot_product_attention(implementation="cudnn")` needs equal q and v head dims; MLA has
  192 and 128, which only the private cuDNN entry point accepts.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # private: MLA head dims

  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (1, T, heads, dqk), jnp.bfloat16)
  k = jax.random.normal(kk, (1, T, heads, dqk), jnp.bfloat16)
  v = jax.random.normal(kv, (1, T, heads, dv), jnp.bfloat16)
  attention = jax.jit(functools.partial(cudnn_attention.dot_product_attention, scale=dqk**-0.5,
                                        mask_type=cudnn_attention.MaskType.CAUSAL, qkv_layout="BTNH"))
  return timing.time_fn(attention, q, k, v)


def lax_topk_seconds(rows: int, S: int, k: int) -> float:  # noqa: N803
  """Seconds of `lax.top_k` over `rows` float32 rows of S random scores (indices consumed)."""
  scores = jax.random.normal(jax.random.key(2), (rows, S), jnp.float32)
  top_k = jax.jit(lambda x: jax.lax.top_k(x, k)[1])
  return timing.time_fn(top_k, scores)
