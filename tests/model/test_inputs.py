"""Bad model inputs fail at the entry with the value and what is allowed: ids outside the vocabulary,
positions and lengths beyond `max_position`, empty batches and sequences. Inside jit only shapes are checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional
from dsa_jax.model.config import tiny

CFG = tiny().replace(num_layers=1, num_mtp_layers=0, max_position=32)


@pytest.fixture(scope="module")
def state():
  return functional.init(CFG, 0)


def _ids(b=1, t=4):
  return np.arange(b * t, dtype=np.int32).reshape(b, t) % CFG.vocab_size


@pytest.mark.parametrize("bad, shown", [(CFG.vocab_size, CFG.vocab_size), (-1, -1)])
def test_ids_outside_the_vocabulary(state, bad, shown):
  ids = _ids(2, 4)
  ids[1, 2] = bad
  with pytest.raises(ValueError, match=rf"input_ids\[1, 2\]={shown} is outside the vocabulary; allowed: "
                                       rf"0 <= value < {CFG.vocab_size}"):
    functional.forward(CFG, state, ids)


def test_next_ids_outside_the_vocabulary(state):
  with pytest.raises(ValueError, match=r"next_ids\[0, 0\]=9999 is outside the vocabulary"):
    functional.apply(CFG, state, _ids(), next_ids=np.full((1, 4), 9999, np.int32))


@pytest.mark.parametrize("shape, message", [
    ((0, 4), r"input_ids has shape \(0, 4\); allowed: \[B, T\] with B >= 1 and 1 <= T <= max_position=32"),
    ((2, 0), r"input_ids has shape \(2, 0\); allowed: \[B, T\]"),
    ((4,), r"input_ids has shape \(4,\); allowed: \[B, T\]"),
    ((1, 33), r"input_ids has shape \(1, 33\); allowed: \[B, T\] with B >= 1 and 1 <= T <= max_position=32"),
])
def test_empty_and_too_long_sequences(state, shape, message):
  with pytest.raises(ValueError, match=message):
    functional.forward(CFG, state, np.zeros(shape, np.int32))


def test_positions_beyond_max_position(state):
  with pytest.raises(ValueError, match=r"positions\[0, 3\]=32 is outside the positions of ModelConfig.max_position"
                                       r"=32; allowed: 0 <= value < 32"):
    functional.forward(CFG, state, _ids(), positions=np.asarray([[29, 30, 31, 32]], np.int32))


def test_under_jit_shapes_are_checked_and_values_are_not(state):
  run = jax.jit(lambda s, ids: functional.forward(CFG, s, ids))
  assert run(state, jnp.asarray(_ids())).shape == (1, 4, CFG.vocab_size)  # tracer: no value check, no error
  with pytest.raises(ValueError, match="max_position=32"):
    run(state, jnp.zeros((1, 33), jnp.int32))
