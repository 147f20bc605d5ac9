"""Every notebook executes top to bottom from a directory outside the checkout (nbclient, the suite's own
Python as the kernel), importing `dsa_jax` as installed from the wheel, as in Colab after its setup cell."""

import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, installed_package, tmp_path, monkeypatch):
  # The kernelspec launches "python": make that this interpreter, whatever PATH the runner had.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  monkeypatch.setenv("PYTHONPATH", str(installed_package))
  monkeypatch.setenv("DSA_JAX_SOURCE", str(REPO))  # where notebook 01 finds the golden fixture
  nb = nbformat.read(path, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell("import dsa_jax; print(dsa_jax.__file__)", id="where"))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
  where = pathlib.Path(nb.cells[-1].outputs[0]["text"].strip())
  assert installed_package in where.parents, where


def test_notebooks_exist():
  assert len(NOTEBOOKS) >= 1
