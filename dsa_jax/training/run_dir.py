"""A run directory remembers the config that defines its run (`run_config.json`), so that a rerun resumes the
same run or stops: resuming with another model or data config would mix two runs in one directory (and an
other shape would fail to restore deep inside Orbax). Starting over is explicit: it sets the earlier run's
files aside under `set_aside/<n>/`, never deletes them.

Used by `training.recipe` (the fields of `recipe.run_identity`) and `experiments.train_grpo` (its flags).
Step counts, logging and checkpoint intervals are not part of the identity: a longer rerun is a resume.
"""

import json
import pathlib
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils

CONFIG = "run_config.json"
ASIDE = "set_aside"


class RunConfigError(ValueError):
  """A rerun asked for another config than the one its run directory was written with."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def set_aside(directory: pathlib.Path) -> pathlib.Path:
  """Moves everything in `directory` (but earlier set-aside runs) into `directory/set_aside/<n>/`."""
  n = 1
  while (directory / ASIDE / str(n)).exists():
    n += 1
  target = directory / ASIDE / str(n)
  target.mkdir(parents=True)
  for entry in sorted(directory.iterdir()):
    if entry.name != ASIDE:
      entry.rename(target / entry.name)
  return target


def remember(directory: str | pathlib.Path, identity: dict, *, restart: bool = False,
             restart_flag: str = "--config.restart_from_scratch=True") -> None:
  """Records `identity` (a JSON-able nested dict) on a run's first start; a rerun with a different one raises
  RunConfigError with one line per differing field. `restart`: set the directory's files aside first and
  start a new run there. Process 0 writes; every process checks."""
  directory = pathlib.Path(directory)
  identity = json.loads(json.dumps(identity, default=str))
  path = directory / CONFIG
  if restart and directory.exists() and any(e.name != ASIDE for e in directory.iterdir()):
    if jax.process_index() == 0:
      print(f"[run] starting over: the earlier run is set aside in {set_aside(directory)}", file=sys.stderr)
    multihost_utils.sync_global_devices("dsa_jax_run_dir_set_aside")
  elif path.exists():
    stored, now = _flat(json.loads(path.read_text())), _flat(identity)
    differ = [f"{k}: {stored.get(k, '(absent)')} in the run directory, {now.get(k, '(absent)')} now"
              for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
    if differ:
      raise RunConfigError("\n".join([f"{directory} holds a run with another config ({path}):", *differ,
                                      f"allowed: the same config; another run directory, or {restart_flag} to "
                                      "set this run aside and start over"]))
    return
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1))
