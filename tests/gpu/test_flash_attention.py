"""Dense attention on the GPU: the default path (cuDNN flash attention where the layout allows, the chunked XLA path
inside the same call where it does not; cuDNN's backward unless the lse has a cotangent) and the `max_segments`
option (packed documents through cuDNN), against the float32 reference: out, lse, dq, dk, dv, at small shapes
and at V3.2's MHA mode (128 heads, 192 / 128, T = S = 32K on sampled rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.flash_attention import api, cudnn, reference
from tests.gpu.checks import BF16_ROUNDING, assert_close_to_scale, assert_within, f32, finite, only_rows, sample_rows
from tests.pallas_kernels.test_flash_attention import LAYOUTS, make_inputs

SCALE = 0.135
# lse: float32 logits of 192 exact bf16 products (192 2^-24 scale sum |q k| ~ 1e-4 here) and exp2 approximations
# (~2^-22 relative): 1e-3. Gradients: as sparse MLA's (bf16 P and dS operands, 2^-8 each): 2e-2 of the largest.
LSE_TOL, GRAD_REL = 1e-3, 2e-2


def test_default_is_cudnn():
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  reason = cudnn.unsupported(bf16(1, 64, 128, 192), bf16(1, 64, 128, 192), bf16(1, 64, 128, 128))
  assert resolve_implementation(None, api.AVAILABLE, reason is None, gpu_choice="cudnn") == "cudnn"


def check(q, k, v, layout, options=None, rows=None, lse_cotangent=False, seed=1):
  """Attention on every query row, checked on `rows` (default all) against the float32 reference; cotangents only
  on `rows` (dlse zero unless `lse_cotangent`: then the backward is the chunked one)."""
  options = options or {}
  B, T, N, _ = q.shape  # noqa: N806
  rows = np.arange(T) if rows is None else rows
  ks = jax.random.split(jax.random.key(seed))
  do = only_rows(jax.random.normal(ks[0], (B, T, N, v.shape[-1]), jnp.bfloat16), rows)

  @jax.jit
  def kernel(q, k, v, do, dlse):
    (out, lse), vjp = jax.vjp(lambda q, k, v: api.flash_attention(q, k, v, **layout, scale=SCALE, **options), q, k, v)
    return out, lse, *vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0.0)))

  dlse = only_rows(jax.random.normal(ks[1], (B, T, N)) * lse_cotangent, rows)
  out, lse, *grads = kernel(q, k, v, do, dlse)
  layout_r = dict(layout, q_positions=layout["q_positions"][:, rows], q_segment_ids=layout["q_segment_ids"][:, rows])
  ref = lambda q, k, v: reference.attention(q, k, v, **layout_r, scale=SCALE)
  (want_out, want_lse), vjp = jax.vjp(ref, f32(q[:, rows]), *f32((k, v)))
  want_grads = vjp((f32(do[:, rows]), jnp.where(jnp.isfinite(want_lse), dlse[:, rows], 0.0)))
  assert np.array_equal(jnp.isneginf(lse[:, rows]), jnp.isneginf(want_lse))
  assert_within(finite(lse[:, rows]), finite(want_lse), LSE_TOL, "lse")
  # out: weights and out rounded to bf16 (2^-8 each; the weights sum to 1): 2^-7 max|v|, plus the lse's error.
  max_v = float(jnp.max(jnp.abs(f32(v))))
  assert_within(out[:, rows], want_out, (2 * BF16_ROUNDING + 2 * LSE_TOL) * max_v, "out")
  for name, got, want in zip(("dq", "dk", "dv"), (grads[0][:, rows], *grads[1:]), want_grads):
    assert_close_to_scale(got, want, GRAD_REL, name)


@pytest.mark.parametrize("lse_cotangent", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_small(kind, shared, lse_cotangent):
  """One document (cuDNN), packed documents, rows that see nothing, a chunk of queries, a decode cache (the chunked
  fallback for the layouts cuDNN cannot mask); MHA (per-head keys) and shared keys."""
  (q, k, v), layout = make_inputs(kind, shared, jnp.bfloat16, hk=64, hv=32, n=4)
  check(q, k, v, layout, lse_cotangent=lse_cotangent)


@pytest.mark.parametrize("max_segments", [1, 4])
def test_v32_production(max_segments):
  """T = S = 32K, 128 heads, 192 / 128: one document (max_segments 1, cuDNN) or three packed ones (cuDNN with
  max_segments 4; the chunked path with the default 1)."""
  T = 32768  # noqa: N806
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (1, T, 128, 192), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, 128, 192), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, T, 128, 128), jnp.bfloat16)
  starts = (0,) if max_segments == 1 else (0, 20000, 30000)
  seg = jnp.asarray(np.searchsorted(starts, np.arange(T), side="right") - 1, jnp.int32)[None]
  pos = jnp.arange(T)[None] - jnp.asarray(starts, jnp.int32)[seg]
  layout = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  check(q, k, v, layout, dict(max_segments=max_segments), rows=sample_rows(T, include=(1, 19999, 20000, 30000)))
