"""Top-k selection on the GPU: the default path (the pruned select with the Mosaic GPU threshold-and-compaction
kernel) must equal `reference.topk_indices` exactly (ties to the lower index, -1 for keys at -inf, ascending), on
the hard rows of the CPU tests and at the production shape (1024 rows of 128K keys, k = 2048)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.topk import api, reference
from tests.pallas_kernels.test_topk import hard_scores

topk = jax.jit(api.topk_indices, static_argnums=1)  # implementation None: the default


def test_default_is_the_kernel():
  assert resolve_implementation(None, api.AVAILABLE) == "pallas"


@pytest.mark.parametrize("n, k", [
    (1000, 64), (257, 256), (37, 50), (128, 1), (8192, 256), (20001, 2048),
    (20000, 6000),  # selected directly over rows longer than the kernel takes: the XLA fallback
])
def test_hard_rows(n, k):
  """Rows of exact ties, fewer visible keys than k, none visible, -0.0 / +0.0, huge magnitudes, one visible half,
  the top keys in few groups (`hard_scores`); selection is exact: no tolerance."""
  scores = hard_scores(n + k, 8, n)
  np.testing.assert_array_equal(topk(scores, k), reference.topk_indices(scores, k))


@pytest.mark.parametrize("ties", [False, True])
def test_production_shape(ties):
  """1024 rows of 131072 keys (one row block of a 128K-token layer), k = 2048; the hard rows first. With `ties`,
  scores are rounded to multiples of 1/4: thousands of equal scores straddle the k-th place of each row."""
  scores = jnp.concatenate([hard_scores(7, 8, 131072),
                            jax.random.normal(jax.random.key(8), (1016, 131072), jnp.float32)])
  if ties:
    scores = jnp.round(scores * 4) / 4
  np.testing.assert_array_equal(topk(scores, 2048), reference.topk_indices(scores, 2048))
