"""Checkpoint locations: a directory as is, a hub id through huggingface_hub's cache (offline here: a fake
cache laid out as the hub writes it), and one-line errors when neither works."""

import shutil
import sys

import chex
import jax
import pytest

import dsa_jax
from dsa_jax.checkpoint import hub
from tests.conftest import FIXTURES

TINY = FIXTURES / "hf_deepseek_v32_tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path):
  """An HF hub cache holding the tiny fixture as the model "dsa-test/tiny" (refs/main -> one snapshot)."""
  repo = tmp_path / "hub" / "models--dsa-test--tiny"
  snapshot = repo / "snapshots" / REVISION
  snapshot.mkdir(parents=True)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(TINY / name, snapshot / name)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(REVISION)
  return tmp_path / "hub"


def test_a_directory_is_used_as_is():
  assert hub.local_dir(TINY) == TINY


def test_hub_id_from_the_local_cache(hf_cache):
  path = hub.local_dir("dsa-test/tiny", local_files_only=True, cache_dir=hf_cache)
  assert path == hf_cache / "models--dsa-test--tiny" / "snapshots" / REVISION


def test_load_hf_takes_a_hub_id(hf_cache, monkeypatch):
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))  # as HF_HUB_CACHE=... would
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  cfg, params = dsa_jax.load_hf("dsa-test/tiny")
  cfg0, params0 = dsa_jax.load_hf(TINY)
  assert cfg == cfg0
  chex.assert_trees_all_close(jax.tree.leaves(params), jax.tree.leaves(params0), atol=0, rtol=0)


def test_hub_id_missing_from_the_cache_is_one_line(hf_cache):
  with pytest.raises(FileNotFoundError, match=r"'dsa-test/other'.*not in the HF cache") as err:
    hub.local_dir("dsa-test/other", local_files_only=True, cache_dir=hf_cache)
  assert "\n" not in str(err.value)


def test_not_a_directory_nor_a_hub_id(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no/such/dir.*neither a directory nor a hub id"):
    hub.local_dir(tmp_path / "no/such/dir")


def test_without_huggingface_hub_says_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when not installed
  with pytest.raises(ImportError, match=r"'dsa-test/tiny'.*pip install huggingface_hub"):
    hub.local_dir("dsa-test/tiny")
