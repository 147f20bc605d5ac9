"""`python -m experiments.generate` on a run's HF export (decoded text, greedy) and on a hub id read from a
local HF cache (offline)."""

import os
import shutil
import subprocess
import sys

import jax
import pytest

import dsa_jax
from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.model import functional
from dsa_jax.sampling import SamplingConfig, generate, left_pad
from tests.conftest import FIXTURES, REPO

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _generate(*flags, env=None):
  done = subprocess.run([sys.executable, "-m", "experiments.generate", "--max_new_tokens=6", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory as train_dsa leaves it with export_hf: a tiny byte-level model in run_dir/hf."""
  run = tmp_path_factory.mktemp("run")
  tok = ByteTokenizer()
  cfg = dsa_jax.preset("tiny").replace(vocab_size=tok.vocab_size, num_mtp_layers=0)
  dsa_jax.save_hf(run / "hf", cfg, functional.init(cfg, 0), tokenizer=tok)
  return run


def test_greedy_text_from_a_run_directory(run_dir):
  code, out, err = _generate(f"--run_dir={run_dir}", "--prompt=sort:4132=", "--temperature=0")
  assert code == 0, err[-2000:]
  tok = ByteTokenizer()
  cfg, params = dsa_jax.load_hf(run_dir / "hf")
  ids, lengths = left_pad([tok.encode("sort:4132=")], 10, tok.pad_id)
  greedy = generate(cfg, params, ids, lengths, jax.random.key(0), SamplingConfig(max_new_tokens=6, temperature=0.0,
                                                                    eos_id=tok.eos_id, pad_id=tok.pad_id))
  expected = tok.decode([int(t) for t, m in zip(greedy.tokens[0], greedy.mask[0]) if m and t != tok.eos_id])
  assert f"'sort:4132=' -> {expected!r}" in out, out


def test_run_directory_without_export_is_one_line(tmp_path):
  code, out, err = _generate(f"--run_dir={tmp_path}")
  assert code != 0 and "export_hf" in err and "Traceback" not in err, err[-2000:]


def test_speculative_without_an_mtp_layer_is_one_line(run_dir):
  code, out, err = _generate(f"--run_dir={run_dir}", "--speculative")
  assert code != 0 and "num_nextn_predict_layers=0" in err and "Traceback" not in err, err[-2000:]


def test_hub_id_from_a_local_cache(tmp_path):
  snapshot = tmp_path / "models--dsa-test--tiny" / "snapshots" / REVISION
  shutil.copytree(FIXTURES / "hf_deepseek_v32_tiny", snapshot, ignore=shutil.ignore_patterns("fp8", "golden.npz"))
  (tmp_path / "models--dsa-test--tiny" / "refs").mkdir()
  (tmp_path / "models--dsa-test--tiny" / "refs" / "main").write_text(REVISION)
  code, out, err = _generate("--hf_path=dsa-test/tiny", "--local_files_only", f"--cache_dir={tmp_path}",
                             "--temperature=0", env={"HF_HUB_OFFLINE": "1"})
  assert code == 0, err[-2000:]
  assert "'Hello' -> [" in out, out  # the fixture ships no tokenizer: ids


def test_speculative_reports_both_decoders_and_the_acceptance_rate():
  code, out, err = _generate("--speculative", "--temperature=0", "--repeats=1", "--prompt=sort:4132=")
  assert code == 0, err[-2000:]
  assert "plain: 6 tokens in " in out and "speculative: 6 tokens in " in out, out
  assert "acceptance " in out and "tokens equal plain decoding's" in out, out
