"""`pip install .` gives a working library: the wheel holds `dsa_jax` and `pallas_kernels` (nothing else at the
top level), and from a directory outside the checkout the installed copy imports and runs the tiny model."""

import os
import subprocess
import sys
import textwrap
import zipfile

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import pathlib, sys
    import dsa_jax, pallas_kernels
    repo = pathlib.Path(sys.argv[1])
    for module in (dsa_jax, pallas_kernels):
      assert repo not in pathlib.Path(module.__file__).parents, module.__file__
    try:
      import experiments
      raise AssertionError(f"experiments importable from {experiments.__file__}")
    except ModuleNotFoundError:
      pass
    import jax.numpy as jnp
    cfg = dsa_jax.preset("tiny")
    logits = dsa_jax.forward(cfg, dsa_jax.init(cfg, 0), jnp.arange(12, dtype=jnp.int32).reshape(2, 6))
    assert logits.shape == (2, 6, cfg.vocab_size) and bool(jnp.isfinite(logits).all()), logits.shape
    print(pathlib.Path(dsa_jax.__file__).parent)
""")


def test_wheel_holds_the_library_packages_only(installed_package):
  (wheel,) = (installed_package.parent / "wheel").glob("*.whl")
  tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
  assert tops == {"dsa_jax", "pallas_kernels", "dsa_jax-0.1.0.dist-info"}, tops


def test_installed_package_runs_from_outside_the_checkout(installed_package, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(installed_package)}
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == str(installed_package / "dsa_jax"), done.stdout
