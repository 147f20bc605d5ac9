"""Grouped matmul on the GPU: the default path (bf16: our scheduled kernel from 64 experts, jax's Hopper ragged-dot
kernels below, jax's transposed kernel for the weight gradient) against per-group float32 matmuls (not
`lax.ragged_dot`): out, dx, dw, at small shapes and at V3.2's expert shapes (7168 <-> 2048, 4096 tokens x 8).
This is the op that once returned relative errors of 0.12-0.30 on the GPU only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.moe_gmm import api
from tests.gpu.checks import BF16_ROUNDING, F32_ROUNDING, assert_within, f32


def test_default_is_the_kernel():
  assert resolve_implementation(None, api.AVAILABLE, True) == "pallas"


@functools.partial(jax.jit, static_argnums=2)
def per_group(x, w, sizes: tuple[int, ...]):
  """x [M, D] @ w[e] for each group's rows (concrete sizes), zero rows past the groups; float32.

  Each group's rows are gathered into one [E, max size, D] batch (zero rows pad the smaller groups) and multiplied
  by one batched matmul: a single matmul shape, where a slice per group would give XLA 256 shapes to autotune."""
  m, width = x.shape[0], max(sizes)
  rows = np.full((len(sizes), width), m)  # row m: a zero row appended below
  for e, start in enumerate(np.cumsum((0,) + sizes[:-1])):
    rows[e, :sizes[e]] = np.arange(start, start + sizes[e])
  grouped = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[rows]
  out = jnp.einsum("end,edf->enf", grouped, w)
  return jnp.zeros((m + 1, w.shape[-1]), out.dtype).at[rows].set(out)[:m]


def random_sizes(seed, m, experts, unassigned):
  """Group sizes summing to m - unassigned, some groups empty."""
  rng = np.random.default_rng(seed)
  weights = rng.exponential(size=experts) * (rng.random(experts) > 0.1)
  sizes = np.floor(weights / weights.sum() * (m - unassigned)).astype(int)
  sizes[np.argmax(sizes)] += m - unassigned - sizes.sum()
  return tuple(int(n) for n in sizes)


def check(M, D, F, sizes, seed=0):  # noqa: N803
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (M, D), jnp.bfloat16)
  w = jax.random.normal(ks[1], (len(sizes), D, F), jnp.bfloat16) * D**-0.5
  dy = jax.random.normal(ks[2], (M, F), jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)

  @jax.jit
  def kernel(x, w, gs, dy):
    out, vjp = jax.vjp(lambda x, w: api.grouped_matmul(x, w, gs), x, w)
    return out, *vjp(dy)

  got = kernel(x, w, gs, dy)
  for g, dtype in zip(got, (x.dtype, x.dtype, w.dtype)):
    assert g.dtype == dtype
  ref = lambda x, w: per_group(x, w, sizes)
  want_out, vjp = jax.vjp(ref, *f32((x, w)))
  want = (want_out, *vjp(f32(dy)))
  # The same products with absolute values: sum |a b| of each result element.
  abs_out, abs_vjp = jax.vjp(ref, *f32((jnp.abs(x), jnp.abs(w))))
  abs_sums = (abs_out, *abs_vjp(f32(jnp.abs(dy))))
  # Exact bf16 products summed in float32 (n terms: gamma_n = n 2^-24) and one bf16 rounding of the result
  # (2^-8 |result|); n = D for out, F for dx, the group's rows (at most M) for dw.
  for name, g, wt, a, n in zip(("out", "dx", "dw"), got, want, abs_sums, (D, F, M)):
    assert_within(g, wt, BF16_ROUNDING * jnp.abs(wt) + (n + 2) * F32_ROUNDING * a, name)


@pytest.mark.parametrize("M, D, F, sizes", [
    (96, 128, 256, (20, 0, 70)),  # an empty group; rows 90..95 belong to no expert
    (80, 100, 72, (33, 47)),  # D, F not tile multiples
    (100, 64, 128, (3, 0, 1) * 21 + (1,)),  # 64 experts: the scheduled kernel; M not a tile multiple
])
def test_small(M, D, F, sizes):  # noqa: N803
  check(M, D, F, sizes)


@pytest.mark.parametrize("experts", [32, 256])  # jax's kernels (32: one GPU of 8-way expert parallelism); ours (256)
@pytest.mark.parametrize("D, F", [(7168, 2048), (2048, 7168)])  # the up / gate projection and the down projection
def test_v32_production(experts, D, F):  # noqa: N803
  """4096 tokens x 8 experts each = 32768 rows, random group sizes with empty groups and 100 unassigned rows."""
  M = 4096 * 8  # noqa: N806
  check(M, D, F, random_sizes(experts, M, experts, unassigned=100), seed=experts)
