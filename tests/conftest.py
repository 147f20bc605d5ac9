"""Test-suite setup: CPU only, float32 matmuls at full precision, fixture paths, the package as installed."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # tests/sharding: 8 devices

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def install_wheel(out: pathlib.Path) -> pathlib.Path:
  """Builds the wheel from a copy of the tree (no build files land in the checkout) and installs it without
  dependencies into `out/site` (the environment's own packages supply them); returns that directory."""
  import shutil
  import subprocess
  import sys

  src = out / "src"
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
      ".git", ".venv", "__pycache__", "runs", "build", "*.egg-info", ".pytest_cache", "fixtures", "notebooks"))
  pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "wheel"), str(src)], check=True)
  (wheel,) = (out / "wheel").glob("dsa_jax-*.whl")
  subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(out / "site"), str(wheel)], check=True)
  return out / "site"


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory) -> pathlib.Path:
  """`dsa_jax` and `pallas_kernels` as `pip install` puts them: put the returned directory on PYTHONPATH."""
  return install_wheel(tmp_path_factory.mktemp("package"))
