"""How every config of the project validates: errors that name the field, its value and what is allowed.

Its own module (it imports nothing from the project) so that data, training, sharding and RL configs use
the same checks without importing the model.
"""

from typing import Any


def check_field(condition: bool, field: str, value: Any, allowed: str) -> None:
  """Raises ValueError naming the field, its value and what is allowed (every config validates this way)."""
  if not condition:
    raise ValueError(f"{field}={value!r} is invalid; allowed: {allowed}.")


def check_positive(obj: Any, *names: str) -> None:
  """Each named field of a config object is a positive integer."""
  for name in names:
    value = getattr(obj, name)
    check_field(isinstance(value, int) and value > 0, f"{type(obj).__name__}.{name}", value, "a positive integer")
