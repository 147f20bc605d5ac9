"""What the GPU tests share: comparisons against error bounds, and sampled query rows for production shapes.

Production shapes (T up to 32K) are checked on a sample of query rows: the kernel runs on every row, the float32
reference only on the sampled ones, and the output cotangent is zero on the other rows, so that the gradients
the kernel returns (also those summed over queries, such as dkv) depend on the sampled rows alone and the
reference can compute them from those rows.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import mla

BF16_ROUNDING = 2.0**-8  # unit roundoff: rounding x to bf16 (8 significant bits) errs by at most 2^-8 |x|
F32_ROUNDING = 2.0**-24  # the same for float32 (24 significant bits)


def f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def sample_rows(t: int, n: int = 256, include=(), seed: int = 0) -> np.ndarray:
  """Sorted distinct rows of [0, t): the first and last, `include` (e.g. document starts) and random others."""
  rng = np.random.default_rng(seed)
  rows = {0, t - 1, *(int(i) for i in include)} | set(rng.choice(t, min(n, t), replace=False).tolist())
  return np.asarray(sorted(rows), np.int32)


def only_rows(x: jax.Array, rows: np.ndarray, axis: int = 1) -> jax.Array:
  """x with every row along `axis` outside `rows` set to zero (a cotangent that touches only the sampled rows)."""
  keep = np.zeros(x.shape[axis], bool)
  keep[rows] = True
  return jnp.where(jnp.asarray(keep).reshape([-1 if a == axis else 1 for a in range(x.ndim)]), x, 0)


def assert_within(got, want, bound, what: str) -> None:
  """|got - want| <= bound elementwise (float32; bound broadcasts), naming the worst element and its ratio."""
  got, want, bound = (np.asarray(x, np.float32) for x in (got, want, bound))
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err = np.abs(got - want)
  bound = np.broadcast_to(bound, err.shape)
  bad = ~(err <= bound)  # NaN fails too
  if bad.any():
    worst = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(bound, 1e-30), 0)), err.shape)
    raise AssertionError(f"{what}: {int(bad.sum())} of {err.size} elements outside the bound; worst at {worst}: "
                         f"got {got[worst]}, want {want[worst]}, |err| {err[worst]:.3g} > bound {bound[worst]:.3g}")


def assert_close_to_scale(got, want, rel: float, what: str) -> None:
  """max |got - want| <= rel * max |want|: for sums of bf16-rounded terms of both signs, where small entries are
  differences of large ones and no elementwise relative bound holds."""
  assert_within(got, want, rel * float(np.max(np.abs(np.asarray(want, np.float32)))), what)


@contextlib.contextmanager
def replayed_topk(topk_per_layer):
  """Inside: every sparse layer attends to the given top-k [B, T, K] instead of its indexer's selection (layer i
  to the i-th; the model is traced once, layers in order). Lets two runs whose selections would flip at near-ties
  compare their continuous parts."""
  chosen = iter(topk_per_layer)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(mla, "select", lambda *args, **kwargs: next(chosen))
    yield
