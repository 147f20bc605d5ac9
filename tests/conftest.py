"""Test-suite setup: CPU only, float32 matmuls at full precision, fixture paths, the package as installed."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  # tests/sharding: 8 devices. LLVM without optimisation: most of the suite's time is compiling small programs that
  # run once, and this cuts its CPU time by about a fifth. Float results may differ in their last bits from an
  # optimised build (one tolerance that was tighter than its summation-order error had to be derived properly).
  # Subprocesses (experiments, notebooks) inherit it.
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if flag.split("=")[0] not in flags:
      flags += " " + flag
  os.environ["XLA_FLAGS"] = flags.strip()

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
