"""dsa_jax.training.memory_check: XLA's estimate of each stage's step plus one state, compared with the memory
available; a run that cannot fit stops with the numbers."""

import pytest

from dsa_jax.data.pipeline import DataConfig
from dsa_jax.model import preset
from dsa_jax.training import memory_check, recipe
from dsa_jax.validation import UserError


def _cfg(**data):
  return recipe.RecipeConfig(model=preset("tiny"), data=DataConfig(**{"seq_len": 64, "batch_size": 2, **data}),
                             run_dir="unused", stages="dense")


@pytest.fixture(scope="module")
def small():
  return memory_check.estimate(_cfg())


def test_the_estimate_grows_with_the_batch_and_counts_one_state(small):
  large = memory_check.estimate(_cfg(batch_size=16))
  assert list(small.step_bytes) == ["dense"] and small.state_bytes > 0
  assert large.step_bytes["dense"] > small.step_bytes["dense"] and large.state_bytes == small.state_bytes
  assert small.total == small.step_bytes["dense"] + small.state_bytes


def test_a_run_that_cannot_fit_stops_with_the_numbers(small, monkeypatch):
  cfg = _cfg()
  monkeypatch.setattr(memory_check, "estimate", lambda *_: small)
  monkeypatch.setattr(memory_check, "available_bytes", lambda: (1024, "host RAM available"))
  with pytest.raises(UserError, match=r"memory estimate: .* GiB .* > 0.00 GiB host RAM available: the run cannot fit"):
    memory_check.check(cfg)
  monkeypatch.setattr(memory_check, "available_bytes", lambda: (2**40, "host RAM available"))
  assert "<= 1024.00 GiB host RAM available" in memory_check.check(cfg)


def test_available_memory_is_read_on_this_machine():
  free, source = memory_check.available_bytes()
  assert free > 0 and source == "host RAM available"
