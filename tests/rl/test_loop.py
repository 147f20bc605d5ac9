"""The GRPO loop resumes by the pre-training loop's rules (`training.checkpointing`): a damaged latest
checkpoint falls back to the one before; a rerun returns every step's record; a non-finite loss stops it
without a save."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from dsa_jax.rl import grpo_step, loop
from dsa_jax.training import checkpointing
from dsa_jax.training.loop import NonFiniteError
from tests.rl.test_grpo_step import CFG, GRPO, LOOP, SAMPLING, TASK, TOK, _params

train = functools.partial(loop.train, CFG, gcfg=GRPO, sampling=SAMPLING, task=TASK, tokenizer=TOK)


def _fresh(params=None):
  return grpo_step.init_state(params or _params(), loop.optimizer(LOOP.learning_rate), 0)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  _, history = train(LOOP, state=_fresh(), run_dir=str(tmp_path))
  damaged = max((p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
  _, rerun = train(LOOP, state=_fresh(), run_dir=str(tmp_path))
  out = capsys.readouterr()
  assert "skipping corrupt checkpoint" in out.err and "resumed at step 1" in out.out
  assert [m["step"] for m in rerun] == [1, 2] and rerun[1]["reward"] == history[1]["reward"]
  assert checkpointing.verify(tmp_path / "checkpoints" / "2") is None  # step 2 saved again


def test_a_non_finite_loss_stops_the_run_without_a_checkpoint(tmp_path):
  poisoned = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          _params())
  with pytest.raises(NonFiniteError, match="step 1"):
    train(dataclasses.replace(LOOP, steps=1), state=_fresh(poisoned), run_dir=str(tmp_path))
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))
