"""Orbax checkpoints of a training stage: the TrainState plus the Grain iterator state (style rule 5).

Periodic asynchronous saves every `every` steps, keep-last-N, a forced save when the loop is asked to stop
(SIGTERM), and restore from the newest checkpoint that reads back. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save leaves a `*.orbax-checkpoint-tmp*` directory
that is never listed as a step; a complete-looking step whose files are damaged fails to restore and is
skipped with a message naming it, and the next older one is tried. Neither is ever used silently.

On a mesh the state's arrays are sharded: every process writes its own shards and `restore_latest` reads
them back into the shardings of `like`. The iterator state is per host (each reads its own documents), so
it goes through Grain's handler, which writes `data/process_<i>-of-<n>.json` from every process.
"""

import dataclasses
import json
import pathlib
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dsa_jax.training.state import TrainState


def _as_dict(state: TrainState) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}


class _Snapshot:
  """An iterator state frozen at save time, in the iterator protocol Grain's handler saves and restores
  (bytes for anything but a live `DatasetIterator`); freezing keeps an async save from seeing later steps."""

  def __init__(self, state: dict | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, raw: bytes) -> None:
    self.state = json.loads(raw)

  def start_prefetch(self) -> None:
    """Called by the handler after a restore; a snapshot has nothing to prefetch."""


class Checkpointer:
  """One stage's checkpoint directory."""

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`) and not saved yet; returns whether a save started."""
    if force:
      self.wait()
      if step in self.manager.all_steps():
        return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)),
                              data=grain.checkpoint.CheckpointSave(_Snapshot(data_state)))
    return self.manager.save(step, args=args, force=force)

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (the interval, and no newer checkpoint)."""
    return self.manager.should_save(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def _report_partial(self) -> None:
    for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
      print(f"[checkpoint] skipping partial checkpoint {tmp} (an interrupted save; never used)", file=sys.stderr)

  def restore_latest(self, like: TrainState) -> tuple[TrainState, dict] | None:
    """(state, this host's iterator state) of the newest readable checkpoint, or None when there is none.

    `like` gives the structure, shapes, dtypes and shardings (an abstract or concrete TrainState).
    """
    self._report_partial()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_dict(like))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(_Snapshot())))
      except Exception as err:  # noqa: BLE001 -- any failure to read means: do not use this checkpoint
        print(f"[checkpoint] skipping corrupt checkpoint {self.directory / str(step)}: "
              f"{type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        continue
      return TrainState(**restored["state"]), restored["data"].state
    return None


def data_state(iterator: Any) -> dict:
  """The Grain iterator's state (JSON-serialisable)."""
  return iterator.get_state()
