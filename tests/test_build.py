"""BUILD names every Python file of the project, nothing that is gone, and current import dependencies."""

import pathlib
import re

from tools import update_build


def test_build_lists_exactly_the_python_files():
  text = (update_build.ROOT / "BUILD").read_text()
  named = {pathlib.Path(p) for p in re.findall(r'"([^"]+\.py)"', text)}
  on_disk = set(update_build.python_files())
  assert not on_disk - named, f"files missing from BUILD: {sorted(map(str, on_disk - named))}"
  assert not named - on_disk, f"BUILD names files that are gone: {sorted(map(str, named - on_disk))}"


def test_build_is_up_to_date():
  assert (update_build.ROOT / "BUILD").read_text() == update_build.render(), (
      "BUILD is out of date: run `python tools/update_build.py`")


def test_every_test_file_is_a_py_test():
  text = (update_build.ROOT / "BUILD").read_text()
  for path in update_build.python_files():
    if path.parts[0] == "tests" and path.name.startswith("test_"):
      assert f'name = "{update_build.target_of(path)}"' in text
