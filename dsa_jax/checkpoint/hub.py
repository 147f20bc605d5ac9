"""Where a checkpoint is: a local directory, or a HuggingFace hub id ("org/name") found in (or downloaded
into) the HF cache through `huggingface_hub.snapshot_download`.

Offline use: `local_files_only=True` (or the environment's HF_HUB_OFFLINE=1) reads the cache only; the cache
is `cache_dir` or HF_HUB_CACHE. Only configs, tokenizer files and safetensors are fetched.
"""

import os
import pathlib
import re

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PATTERNS = ("*.json", "*.safetensors")


def local_dir(path_or_id: str | os.PathLike, *, local_files_only: bool | None = None,
              cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """A local checkpoint directory: `path_or_id` when it is a directory, else the hub id's cached snapshot.

  local_files_only: None lets HF_HUB_OFFLINE decide (huggingface_hub's default).
  """
  if pathlib.Path(path_or_id).is_dir():
    return pathlib.Path(path_or_id)
  name = str(path_or_id)
  if not HUB_ID.fullmatch(name):
    raise FileNotFoundError(f"checkpoint {name!r} is neither a directory nor a hub id; allowed: an HF checkpoint "
                            "directory or 'org/name'.")
  try:
    import huggingface_hub
  except ImportError:
    raise ImportError(f"checkpoint {name!r} is not a directory, and a hub id needs huggingface_hub: "
                      "pip install huggingface_hub") from None
  kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(name, cache_dir=cache_dir, allow_patterns=list(PATTERNS),
                                                          **kwargs))
  except huggingface_hub.errors.LocalEntryNotFoundError:
    where = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    raise FileNotFoundError(f"checkpoint {name!r} is not a directory and not in the HF cache {where} (local "
                            "files only); allowed: a directory, or a hub id in that cache.") from None
  except huggingface_hub.errors.HfHubHTTPError as err:
    raise FileNotFoundError(f"checkpoint {name!r} is neither a directory nor a hub id that downloads: "
                            f"{str(err).splitlines()[0]}") from None
