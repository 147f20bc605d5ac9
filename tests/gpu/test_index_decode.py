"""Indexer decode on the GPU: `index_decode_topk` (the split-K scores kernel + the pruned select) by default,
against the reference; at small shapes (shuffled pages, pages of 32 and 64, MTP's two rows per sequence, fewer
than k visible keys, an empty row) and at V3.2's (64 x 128 index heads, k = 2048, 32K keys, 128 rows). Integer
inputs make every score exact whatever the summation order, so selection and scores are compared exactly, ties
included; normal inputs compare the scores within a rounding bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.index_decode import api, reference
from tests.gpu.checks import F32_ROUNDING, assert_within, finite
from tests.gpu.test_lightning_indexer import FP8_ACC_ROUNDING
from tests.pallas_kernels.test_index_decode import paged_inputs


def test_default_is_the_kernel():
  args = paged_inputs(0, (64,))
  assert resolve_implementation(None, api.AVAILABLE, api._kernel_supports(args["q"], args["idx_k"], args["idx_scale"], 64)) == "pallas"


def assert_exact(args, k, page_size):
  got = jax.jit(lambda a: api.index_decode_topk(**a, k=k, page_size=page_size))(args)
  want = reference.index_decode_topk(**args, k=k, page_size=page_size)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("lengths, rows_per_seq, page_size, k", [
    ((1000, 300, 0), 2, 64, 512), ((700, 5), 1, 32, 128), ((4096,), 1, 128, 2048)])
def test_small_exact(lengths, rows_per_seq, page_size, k, fp8):
  assert_exact(paged_inputs(1, lengths, heads=8, page_size=page_size, fp8=fp8, rows_per_seq=rows_per_seq), k,
               page_size)


@pytest.mark.parametrize("fp8", [True, False])
def test_v32_production(fp8):
  """128 rows over 32K keys (lengths from 1 to 32K), 64 x 128 index heads, k = 2048: the selection and scores
  exactly on integer inputs; the scores of normal inputs within their rounding bound."""
  lengths = tuple(int(n) for n in np.linspace(1, 32768, 128))
  assert_exact(paged_inputs(2, lengths, heads=64, fp8=fp8), 2048, 64)
  args = paged_inputs(3, lengths, heads=64, fp8=fp8, integer=False)
  got = jax.jit(lambda a: api.index_decode_scores(**a, page_size=64))(args)
  want = reference.index_decode_scores(**args, page_size=64)
  np.testing.assert_array_equal(jnp.isneginf(got), jnp.isneginf(want))
  # Any summation order of H products per head and of I weighted heads errs by at most
  # (H rounding + (I + 4) 2^-24) sum_j |w_j| |q_j| . |k| q_scale_j k_scale (the gamma_n bound).
  absolute = dict(args, q=jnp.abs(args["q"]), idx_k=jnp.abs(args["idx_k"]), weights=jnp.abs(args["weights"]))
  abs_sum = finite(reference.index_decode_scores(**absolute, page_size=64))
  bound = (128 * (FP8_ACC_ROUNDING if fp8 else F32_ROUNDING) + 68 * F32_ROUNDING) * abs_sum
  assert_within(finite(got), finite(want), bound, "scores")
