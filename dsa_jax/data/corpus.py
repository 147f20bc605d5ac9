"""Text sources: the embedded default corpus (the Python standard library's own source files, present on
every machine that runs Python, so nothing is downloaded) and user text / JSONL files."""

import json
import pathlib
import sysconfig


def stdlib_files() -> list[pathlib.Path]:
  """The top-level `*.py` files of this interpreter's standard library, sorted (a deterministic order)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.glob("*.py") if p.is_file())
  if not files:
    raise FileNotFoundError(f"no *.py files under the standard library directory {root}")
  return files


def read_documents(paths: list[pathlib.Path] | tuple[str, ...]) -> list[str]:
  """One document per text file; one per line of a `.jsonl` file (its "text" field)."""
  docs = []
  for path in map(pathlib.Path, paths):
    if path.suffix == ".jsonl":
      with path.open(encoding="utf-8") as f:
        docs.extend(json.loads(line)["text"] for line in f if line.strip())
    else:
      docs.append(path.read_text(encoding="utf-8", errors="replace"))
  return [d for d in docs if d.strip()]


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """(train, eval): every k-th document is held out, k = round(1 / eval_fraction)."""
  every = max(2, round(1 / eval_fraction))
  return ([d for i, d in enumerate(docs) if i % every != every - 1],
          [d for i, d in enumerate(docs) if i % every == every - 1])
