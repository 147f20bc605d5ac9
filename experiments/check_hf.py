"""Loads an HF DeepSeek-V3.2 checkpoint directory, runs the forward pass and, where the directory holds a
`golden.npz` (tests/fixtures layout), compares logits, hidden states and top-k selections with it.

  python -m experiments.check_hf                       # the embedded tiny fixture (HF transformers golden)
  python -m experiments.check_hf --path=DIR --attention=dense --dtype=bfloat16

Verdict: PASS when every output the golden file holds is within `--tolerance` (max |ours - HF| / max |HF|;
default 1e-4 in float32, 2e-2 in bfloat16) and at most `--topk_mismatch` of the query rows select another top-k
set than HF (default 0); otherwise FAIL and exit status 1. Outputs the golden file lacks are skipped, saying so.
The golden file is HF's DSA forward: `--attention=dense` is expected to FAIL against it.
"""

import pathlib
import sys
import time

import jax
import numpy as np
from absl import flags

import dsa_jax
from dsa_jax.model import functional
from experiments import cli

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf_deepseek_v32_tiny"
_PATH = flags.DEFINE_string("path", str(FIXTURE), "HF checkpoint directory (config.json + safetensors).")
_ATTENTION = flags.DEFINE_enum("attention", "sparse", ["sparse", "dense"], "DSA or dense attention.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_SEQ = flags.DEFINE_integer("seq_len", 40, "Length of the random prompt when there is no golden.npz.", lower_bound=1)
_TOLERANCE = flags.DEFINE_float("tolerance", None, "Largest max |ours - HF| / max |HF| that passes (default: "
                                "1e-4 in float32, 2e-2 in bfloat16).", lower_bound=0.0)
_TOPK_MISMATCH = flags.DEFINE_float("topk_mismatch", 0.0, "Largest fraction of query rows whose top-k set may "
                                    "differ from HF's and pass.", lower_bound=0.0, upper_bound=1.0)
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
_ALLOW_NON_FINITE = flags.DEFINE_bool("allow_non_finite", False, "Load weights that hold NaN or Inf (default: an "
                                      "error naming the file and tensor).")


def relative_error(ours, golden) -> float:
  return float(np.abs(np.asarray(ours, np.float32) - golden).max() / np.abs(golden).max())


def topk_mismatch(ours, golden) -> float:
  """Fraction of query rows whose selected set (order ignored) differs from the golden one."""
  return float(np.mean(np.any(np.sort(np.asarray(ours), -1) != np.sort(golden, -1), axis=-1)))


def compare(cfg, out, golden: dict) -> tuple[list[tuple[str, float, float | None]], list[str]]:
  """-> (rows: (output, relative error, top-k mismatch or None), names of golden arrays missing)."""
  rows, missing = [("logits", relative_error(out.logits, golden["logits"]), None)], []
  for i in range(cfg.num_layers):
    hidden, topk = golden.get(f"hidden_layer{i}"), golden.get(f"topk_indices_layer{i}")
    ours_topk = out.layer_aux[i].attention.topk_indices
    missing += [f"hidden_layer{i}"] * (hidden is None) + [f"topk_indices_layer{i}"] * (topk is None)
    if hidden is not None or topk is not None:
      rows.append((f"layer {i}", relative_error(out.hidden_states[i], hidden) if hidden is not None else float("nan"),
                   None if topk is None or ours_topk is None else topk_mismatch(ours_topk, topk)))
  return rows, missing


def verdict(rows, tolerance: float, max_mismatch: float) -> bool:
  errors_ok = all(np.isnan(err) or err <= tolerance for _, err, _ in rows)
  return errors_ok and all(m is None or m <= max_mismatch for _, _, m in rows)


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", "highest")
  path = pathlib.Path(_PATH.value)
  start = time.perf_counter()
  cfg, params = dsa_jax.load_hf(path, dtype=_DTYPE.value, allow_non_finite=_ALLOW_NON_FINITE.value)
  print(f"loaded {path} in {time.perf_counter() - start:.1f}s: {dsa_jax.count_params(params):,} parameters, "
        f"{cfg.num_layers} layers, indexer top-k {cfg.indexer.topk if cfg.indexer else None}")
  golden_file = path / "golden.npz"
  golden = dict(np.load(golden_file)) if golden_file.exists() else {}
  ids = golden.get("input_ids", np.random.default_rng(0).integers(0, cfg.vocab_size, (1, _SEQ.value)))
  run = jax.jit(lambda p, x: functional.apply(cfg, p, x, attention=_ATTENTION.value))
  start = time.perf_counter()
  out = jax.block_until_ready(run(params, ids))
  print(f"forward {tuple(ids.shape)} -> logits {tuple(out.logits.shape)} in {time.perf_counter() - start:.1f}s "
        f"(with compilation), attention={_ATTENTION.value}")
  if not golden:
    print("no golden.npz next to the checkpoint: nothing to compare, no verdict")
    return
  rows, missing = compare(cfg, out, golden)
  if missing:
    print(f"skipped (not in {golden_file.name}): {', '.join(missing)}")
  print(f"\n{'output':<10} {'max |ours - HF| / max |HF|':>28}  top-k rows unlike HF")
  for name, err, mismatch in rows:
    print(f"{name:<10} {err:>28.2e}  {'' if mismatch is None else f'{mismatch:.1%}'}")
  tolerance = _TOLERANCE.value if _TOLERANCE.value is not None else DEFAULT_TOLERANCE[_DTYPE.value]
  passed = verdict(rows, tolerance, _TOPK_MISMATCH.value)
  print(f"\n{'PASS' if passed else 'FAIL'}: tolerance max |ours - HF| / max |HF| <= {tolerance:g}, top-k rows unlike "
        f"HF <= {_TOPK_MISMATCH.value:.1%} ({_DTYPE.value}, attention={_ATTENTION.value})")
  if not passed:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
