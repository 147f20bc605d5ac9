"""Config checks that name the field, and frozen dataclasses built from config trees (`dsa_jax.validation`)."""

import dataclasses

import ml_collections
import pytest

from dsa_jax.validation import check_field, check_positive, dataclass_from_config


@dataclasses.dataclass(frozen=True)
class Inner:
  a: int = 1
  b: int = 2

  def __post_init__(self):
    check_positive(self, "a", "b")


@dataclasses.dataclass(frozen=True)
class Outer:
  inner: Inner = Inner()
  maybe: Inner | None = None
  files: tuple[str, ...] = ()
  name: str = "x"


def test_nested_dicts_build_nested_dataclasses():
  got = dataclass_from_config(Outer, {"inner": {"b": 5}, "maybe": {"a": 3}, "files": "p.txt, q.txt"})
  assert got == Outer(inner=Inner(1, 5), maybe=Inner(3, 2), files=("p.txt", "q.txt"))
  assert dataclass_from_config(Outer, {"files": ""}) == Outer()


def test_an_instance_keeps_the_values_a_tree_leaves_out():
  base = Outer(inner=Inner(7, 8), name="y")
  assert dataclass_from_config(base, {"inner": {"a": 4}}) == Outer(inner=Inner(4, 8), name="y")


def test_a_config_dict_and_its_command_line_types():
  tree = ml_collections.ConfigDict({"inner": {"a": 6}, "name": "z"})
  assert dataclass_from_config(Outer, tree) == Outer(inner=Inner(6, 2), name="z")


def test_unknown_keys_and_invalid_values_name_the_field():
  with pytest.raises(ValueError, match=r"Outer.inner.c is unknown; allowed: \['a', 'b'\]"):
    dataclass_from_config(Outer, {"inner": {"c": 1}})
  with pytest.raises(ValueError, match=r"Inner.b=0 is invalid; allowed: a positive integer"):
    dataclass_from_config(Outer, {"maybe": {"b": 0}})


def test_a_huge_value_is_cut_in_the_message():
  with pytest.raises(ValueError, match=r"^x=\[0, 1, .*\.\.\. \(\d+ characters\) is invalid; allowed: short\.$") as e:
    check_field(False, "x", list(range(100_000)), "short")
  assert len(str(e.value)) < 300
