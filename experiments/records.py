"""The JSON record every benchmark writes: date, git commit, device kind, exact command, rows."""

import datetime
import json
import pathlib
import subprocess


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def header(device: str, command: str) -> dict:
  """The fields of a record other than its rows, dated now (UTC)."""
  now = datetime.datetime.now(datetime.timezone.utc)
  return dict(date=now.isoformat(timespec="seconds"), commit=git_commit(), device=device, command=command)


def write(out_dir: str, name: str, record: dict) -> pathlib.Path:
  """Writes `record` to out_dir/<name>_<its date>.json (rewritten in place when called again) -> the path."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.fromisoformat(record["date"]).strftime("%Y%m%d_%H%M%S")
  path = out / f"{name}_{stamp}.json"
  path.write_text(json.dumps(record, indent=1))
  return path
