"""Orbax checkpoints of a loop's state pytree (style rule 5), with integrity checks and the resume rules
every loop shares (the pre-training stages and GRPO).

What it guarantees:
  * Sealed saves. Orbax writes each step into a temporary directory and renames it when complete (a crash
    mid-save leaves a `*.orbax-checkpoint-tmp*` directory, never listed as a step). Once the save has
    committed, process 0 writes `<step>/manifest.sha256.json`: the SHA-256 of every other file of the step.
  * Verified restores. `restore_latest` checks the manifest before reading: a step whose bytes changed
    ("corrupt") or that has no manifest ("unverifiable": interrupted before sealing, or written by an older
    version) is skipped with a one-line message naming it, and the next older one is tried. A step that
    verifies but does not fit the state asked for (another model config) stops the run with one line saying
    so: it is not corrupt, and an older step would not fit either. When every step is unusable, it stops with
    one line listing them: never a silent restart from step 0.
  * `resume` (what the loops call) also moves the unusable steps newer than the restored one into
    `unusable/`, kept for inspection, so that the re-run saves those steps again (a corrupt final checkpoint
    is replaced, not kept in the way of the final save).
  * Keep-last-N never deletes the known-good checkpoint: the last one that restored and then produced finite
    metrics (`confirm`, recorded in `known_good.json`), until a newer one has. The loops save only states
    whose metrics were checked finite (`loop.check_finite`).
Limits: the manifest detects changed bytes, not a deliberate forgery (whoever edits the files can rewrite it);
verification reads every byte of the step once per process (SHA-256 in parallel threads).

On a mesh the state's arrays are sharded: every process writes its own shards and `restore_latest` reads
them back into the shardings of `like`. The iterator state is per host (each reads its own documents), so
it goes through Grain's handler, which writes `data/process_<i>-of-<n>.json` from every process.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import pathlib
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.sha256.json"
KNOWN_GOOD = "known_good.json"
UNUSABLE = "unusable"


class CheckpointError(RuntimeError):
  """No checkpoint of a directory can be used, or an intact one does not fit the run's state."""


def _as_dict(state) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _first_line(err: Exception, limit: int = 300) -> str:
  """The first non-empty line of an error, cut to `limit` characters (Orbax's can run to thousands of lines)."""
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  text = f"{type(err).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit] + "..."


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def _digests(step_dir: pathlib.Path) -> dict[str, str]:
  """{relative path: SHA-256} of every file of a step directory but the manifest."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL on large blocks
    return dict(zip((str(p.relative_to(step_dir)) for p in files), pool.map(_sha256, files)))


def verify(step_dir: pathlib.Path) -> tuple[str, str] | None:
  """None when the step's files match its manifest, else (kind, why): kind "corrupt" or "unverifiable"."""
  try:
    expected = json.loads((step_dir / MANIFEST).read_text())["sha256"]
  except FileNotFoundError:
    return "unverifiable", f"no {MANIFEST} (the save was interrupted before it was sealed, or is older)"
  except (ValueError, KeyError, TypeError) as err:
    return "corrupt", f"{MANIFEST} is unreadable ({_first_line(err, 100)})"
  found = _digests(step_dir)
  for name in sorted(set(expected) | set(found)):
    if name not in found:
      return "corrupt", f"{name} is missing"
    if name not in expected:
      return "corrupt", f"{name} is not in the manifest"
    if found[name] != expected[name]:
      return "corrupt", f"{name} does not match its SHA-256 in the manifest"
  return None


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
  """One loop's checkpoint directory: a state dataclass pytree, plus the data iterator's state when `data`."""

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int = 3, async_save: bool = True,
               data: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.keep, self.data = keep, data
    options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=every,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data") if data else ("state",))
    self.primary = jax.process_index() == 0
    self.unsealed: list[int] = []
    self.restored_step: int | None = None
    self.skipped: list[int] = []  # unusable steps newer than the restored one
    known = self.directory / KNOWN_GOOD
    self.known_good: int | None = json.loads(known.read_text())["step"] if known.exists() else None

  def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`) and not saved yet; returns whether a save started.

    Call it only with a state whose metrics were checked finite. Seals finished saves on every call.
    """
    self._seal(block=False)
    if not (force or self.manager.should_save(step)):
      return False
    self.wait()  # Orbax waits for the previous save anyway; sealing and pruning it here costs nothing more
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(_as_dict(state))}
    if self.data:
      items["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_state))
    started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if started:
      self.unsealed.append(step)
    return started

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (the interval, and no newer checkpoint)."""
    return self.manager.should_save(step)

  def wait(self) -> None:
    """Waits for the save in flight, seals it and applies keep-last-N (every process calls it at once)."""
    self._seal(block=True)
    self._prune()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _seal(self, block: bool) -> None:
    """Writes the manifest of each committed save (process 0; the others only forget them)."""
    if not self.unsealed:
      return
    if block:
      self.manager.wait_until_finished()
    elif self.manager.is_saving_in_progress():
      return
    for step in self.unsealed:
      step_dir = self.directory / str(step)
      if self.primary and step_dir.is_dir():
        (step_dir / MANIFEST).write_text(json.dumps({"sha256": _digests(step_dir)}, indent=0))
    self.unsealed = []

  def _prune(self) -> None:
    """Deletes all but the newest `keep` steps, sparing the known-good one."""
    steps = sorted(self.manager.all_steps())
    for step in steps[:max(len(steps) - self.keep, 0)]:
      if step != self.known_good:
        self.manager.delete(step)

  def confirm(self) -> None:
    """The restored checkpoint produced finite metrics: it becomes the known-good one (called by the loops)."""
    if self.restored_step is None or self.restored_step == self.known_good:
      return
    self.known_good = self.restored_step
    if self.primary:
      (self.directory / KNOWN_GOOD).write_text(json.dumps({"step": self.known_good}))

  def _report_partial(self) -> None:
    for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
      print(f"[checkpoint] skipping partial checkpoint {tmp} (an interrupted save; never used)", file=sys.stderr)

  def restore_latest(self, like) -> tuple[Any, dict | None] | None:
    """(state, this host's iterator state or None) of the newest usable checkpoint; None when there is none.

    `like` gives the structure, shapes, dtypes and shardings (an abstract or concrete state dataclass).
    Raises CheckpointError when checkpoints exist but none is usable, or an intact one does not fit `like`.
    """
    self._report_partial()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_dict(like))
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = self.directory / str(step)
      problem = verify(step_dir)
      if problem is not None:
        print(f"[checkpoint] skipping {problem[0]} checkpoint {step_dir}: {problem[1]}", file=sys.stderr)
        skipped.append((step, f"{step_dir} ({problem[0]}: {problem[1]})"))
        continue
      items = {"state": ocp.args.StandardRestore(abstract)}
      if self.data:
        items["data"] = grain.checkpoint.CheckpointRestore(_Snapshot())
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as err:  # noqa: BLE001 -- intact files: the run asks for another state
        raise CheckpointError(f"checkpoint {step_dir} is intact (its files match {MANIFEST}) but does not fit "
                              f"this run's state: {_first_line(err)}; allowed: the config it was written with, "
                              "or another run directory") from None
      self.restored_step, self.skipped = step, [s for s, _ in skipped]
      return type(like)(**restored["state"]), restored["data"].state if self.data else None
    if skipped:
      raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(why for _, why in skipped)
                            + "; allowed: restore one of them, or start over explicitly (train_dsa: "
                            "--config.restart_from_scratch=True, train_grpo: --overwrite)")
    return None

  def resume(self, like, label: str = "checkpoint") -> tuple[Any, dict | None] | None:
    """`restore_latest`, then moves the unusable steps newer than the restored one into `unusable/` so that
    the re-run saves them again; prints where it resumed. The resume of every loop."""
    restored = self.restore_latest(like)
    if restored is None:
      return None
    if self.skipped and self.primary:
      aside = self.directory / UNUSABLE
      aside.mkdir(exist_ok=True)
      for step in self.skipped:
        target = aside / str(step)
        suffix = 1
        while target.exists():
          target, suffix = aside / f"{step}.{suffix}", suffix + 1
        (self.directory / str(step)).rename(target)
        print(f"[checkpoint] moved unusable checkpoint {self.directory / str(step)} to {target}", file=sys.stderr)
    if self.skipped:
      ocp.multihost.sync_global_processes("dsa_jax_checkpoint_set_aside")
      self.manager.reload()
    print(f"[{label}] resumed at step {self.restored_step} from {self.directory}", flush=True)
    return restored


def data_state(iterator: Any) -> dict:
  """The Grain iterator's state (JSON-serialisable)."""
  return iterator.get_state()
