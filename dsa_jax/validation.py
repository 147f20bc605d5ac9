"""How every config of the project validates: errors that name the field, its value and what is allowed; and
frozen config dataclasses built from the nested dicts of config files, every key checked.

Its own module (it imports nothing from the project) so that data, training, sharding and RL configs use
the same checks without importing the model. The array checks (`check_int_range`) run on concrete values
only: inside `jit` an array is a tracer whose values are unknown, so they check it where it enters from
Python (the model's eager call, the sampler, the training loop's host batches).
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class UserError(ValueError):
  """A mistake in what the user gave (a config value, a flag, a file), not a bug: the command-line entry points
  (`experiments/cli.py`) print its message as one line instead of a traceback. A ValueError, so that callers
  that catch ValueError keep working."""


def check_field(condition: bool, field: str, value: Any, allowed: str) -> None:
  """Raises UserError naming the field, its value (its repr cut at 200 characters) and what is allowed (every
  config validates this way)."""
  if not condition:
    shown = repr(value)
    shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"
    raise UserError(f"{field}={shown} is invalid; allowed: {allowed}.")


def check_positive(obj: Any, *names: str) -> None:
  """Each named field of a config object is a positive integer."""
  for name in names:
    value = getattr(obj, name)
    check_field(isinstance(value, int) and value > 0, f"{type(obj).__name__}.{name}", value, "a positive integer")


def is_concrete(x: Any) -> bool:
  """Whether the values of `x` can be read here: not a tracer (inside jit, vmap, grad) and not spread over
  other hosts' devices."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_int_range(name: str, x: Any, low: int, high: int, what: str) -> None:
  """Every value of the integer array `x` lies in [low, high); else a ValueError naming the array, the first
  bad value and its index. One min and one max on the host copy (numpy: a concrete array closed over by a
  traced function stays concrete, while a jnp reduction of it would be traced); a no-op for tracers
  (`is_concrete`) and empty arrays."""
  if not is_concrete(x):
    return
  x = np.asarray(x)
  if x.size == 0:
    return
  lo, hi = int(x.min()), int(x.max())
  if low <= lo and hi < high:
    return
  bad = lo if lo < low else hi
  index = tuple(int(i) for i in np.argwhere(x == bad)[0])
  raise ValueError(f"{name}[{', '.join(map(str, index))}]={bad} is outside the {what}; allowed: "
                   f"{low} <= value < {high}.")


def as_dict(tree: Any) -> dict:
  """A nested dict from a mapping or an `ml_collections.ConfigDict` (its `to_dict()`)."""
  tree = tree.to_dict() if hasattr(tree, "to_dict") else tree
  if not isinstance(tree, Mapping):
    raise TypeError(f"a config tree must be a mapping or a ConfigDict, not {type(tree).__name__}.")
  return dict(tree)


def _dataclass_in(annotation: Any) -> type | None:
  """The dataclass of a field annotated `X` or `X | None`, else None."""
  options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
  found = [t for t in options if dataclasses.is_dataclass(t)]
  return found[0] if len(found) == 1 else None


def dataclass_from_config(base: Any, tree: Any, *, where: str | None = None) -> Any:
  """A frozen dataclass from a nested dict or ConfigDict (a config file's section), every key checked.

  base: a dataclass type (absent keys take its defaults) or an instance (absent keys keep its values: a preset
  with a few fields overridden). A nested dict builds the dataclass of its field the same way, from the field's
  current value where there is one, so {"indexer": {"topk": 32}} keeps the indexer's other fields. A
  comma-separated string fills a `tuple[str, ...]` field ("a.txt,b.txt"; "" is empty), as a command line
  gives it. An unknown key raises UserError naming it and the allowed ones; the dataclass validates the rest.
  """
  cls = base if isinstance(base, type) else type(base)
  where = where or cls.__name__
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls) if f.init]
  values = {}
  for key, value in as_dict(tree).items():
    if key not in names:
      raise UserError(f"{where}.{key} is unknown; allowed: {sorted(names)}.")
    nested = _dataclass_in(hints[key])
    if nested is not None and (isinstance(value, Mapping) or hasattr(value, "to_dict")):
      current = None if isinstance(base, type) else getattr(base, key)
      value = dataclass_from_config(nested if current is None else current, value, where=f"{where}.{key}")
    elif typing.get_args(hints[key]) == (str, ...) and isinstance(value, str):
      value = tuple(part.strip() for part in value.split(",") if part.strip())
    values[key] = value
  return cls(**values) if isinstance(base, type) else dataclasses.replace(base, **values)
