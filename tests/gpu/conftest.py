"""The GPU suite runs only where JAX's default backend is a GPU: elsewhere every test in this folder is skipped at
collection (nothing compiled), so CPU CI lists them as skips.

Run it on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest -q tests/gpu` (tests/conftest.py defaults
JAX_PLATFORMS to cpu, so without it the suite would skip on the GPU machine too); `-m "not slow"` leaves out the
model tests at production shapes, `-m slow` runs only them.
"""

import pathlib

import jax
import pytest

HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
  del config
  backend = jax.default_backend()
  if backend == "gpu":
    return
  skip = pytest.mark.skip(reason=f"GPU suite: jax.default_backend() is {backend!r}, not 'gpu'; run it on a GPU "
                          "machine with `JAX_PLATFORMS=cuda python -m pytest -q tests/gpu`.")
  for item in items:
    if HERE in pathlib.Path(str(item.path)).resolve().parents:
      item.add_marker(skip)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a GPU test of production shapes (over ~60 s); `-m 'not slow'` leaves "
                          "them out, `-m slow` runs only them.")
