"""What every experiment's command line shares: user errors in one line, outputs never overwritten silently, and
a clear stop where a command needs a GPU.

  if __name__ == "__main__":
    cli.run(main)

`run` wraps `absl.app.run`. A user error (`dsa_jax.validation.UserError`, which config checks raise; a missing
file; a config file that does not load or an override of a field it lacks) prints `error: <message>` on one
line and exits with status 1; `--verbose` shows the traceback instead. Errors of other types are bugs and keep
their traceback. A ValueError is a user error only where `user_errors()` marks the boundary (building a config
from flags), since deeper in the code it may be a bug. Flag values out of range are refused by absl itself
(`lower_bound=`), also in one line.
"""

import contextlib
import datetime
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dsa_jax.validation import UserError

_VERBOSE = flags.DEFINE_bool("verbose", False, "On a user error (bad flag or config value, missing file), show the "
                             "traceback, not only the one-line message.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an output file given with --out that exists already "
                               "(without it, the command refuses).")

OUTPUT_ROOT = pathlib.Path("/tmp/dsa_jax")
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
EXIT_USER_ERROR = 1


def _one_line(err: BaseException) -> str:
  """An exception's message on one line (KeyError's without the quotes its str adds)."""
  text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
  return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or type(err).__name__


def _fail(err: BaseException, where: str = "") -> None:
  print(f"error: {where}{_one_line(err)} (--verbose shows the traceback)", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing (which reports a bad flag value itself), with a config file's failures in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except Exception as err:  # noqa: BLE001 -- loading a config file (ml_collections) raises any type
    if "--verbose" in argv:
      raise
    _fail(err, "in the flags: ")


def define_config_file(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file`, whose overrides (`--config.train.steps=...`) are read from sys.argv as it
  is defined, at import: an override of a field the file lacks fails there, in one line like the others."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except Exception as err:  # noqa: BLE001 -- ml_collections raises KeyError, AttributeError, ...
    if "--verbose" in sys.argv:
      raise
    _fail(err, "in the flags: ")


def run(main) -> None:
  """`absl.app.run(main)` with user errors printed on one line (see the module docstring)."""

  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as err:
      if _VERBOSE.value:
        raise
      _fail(err)

  app.run(guarded, flags_parser=_parse_flags)


@contextlib.contextmanager
def user_errors():
  """Marks a boundary where a ValueError or OSError is the user's (a config built from flags, a config file that
  does not load): it becomes a UserError."""
  try:
    yield
  except UserError:
    raise
  except (ValueError, OSError) as err:
    raise UserError(_one_line(err)) from err


def output_path(out: str, name: str, filename: str) -> pathlib.Path:
  """Where a command writes its file, never over an earlier one unless asked.

  `out` empty: a new run directory `/tmp/dsa_jax/<name>/<date_time>/<filename>`. `out` given (e.g. the committed
  report under docs/): that path, refused with a UserError when it exists, unless `--overwrite`.
  """
  if not out:
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    return OUTPUT_ROOT / name / stamp / filename
  path = pathlib.Path(out)
  if path.exists() and not _OVERWRITE.value:
    raise UserError(f"--out={out} exists; allowed: a new path, or --overwrite to replace it.")
  return path


def require_gpu(command: str, allow_cpu: bool | None = None) -> None:
  """Stops at once, before any work, where JAX has no GPU, unless `allow_cpu` (None: the command has no such
  flag)."""
  backend = jax.default_backend()
  if backend != "gpu" and not allow_cpu:
    hint = "" if allow_cpu is None else " (or pass --allow_cpu for a slow check on this machine)"
    raise UserError(f"{command} measures GPU performance, but JAX's backend here is {backend!r}; allowed: a machine "
                    f"with a GPU{hint}.")


def positive_ints(holder: flags.FlagHolder) -> list[int]:
  """The values of a comma-separated list flag as positive integers, or a UserError naming the flag."""
  try:
    values = [int(v) for v in holder.value]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise UserError(f"--{holder.name}={','.join(holder.value)} is invalid; allowed: positive integers, "
                    "comma-separated.")
  return values
