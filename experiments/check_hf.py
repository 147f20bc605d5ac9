"""Loads an HF DeepSeek-V3.2 checkpoint directory, runs the forward pass and, where the directory holds a
`golden.npz` (tests/fixtures layout), compares logits, hidden states and top-k selections with it.

  python -m experiments.check_hf                       # the embedded tiny fixture (HF transformers golden)
  python -m experiments.check_hf --path=DIR --attention=dense --dtype=bfloat16
"""

import pathlib
import time

import jax
import numpy as np
from absl import app, flags

import dsa_jax
from dsa_jax.model import functional

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf_deepseek_v32_tiny"
_PATH = flags.DEFINE_string("path", str(FIXTURE), "HF checkpoint directory (config.json + safetensors).")
_ATTENTION = flags.DEFINE_enum("attention", "sparse", ["sparse", "dense"], "DSA or dense attention.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_SEQ = flags.DEFINE_integer("seq_len", 40, "Length of the random prompt when there is no golden.npz.")
_ALLOW_NON_FINITE = flags.DEFINE_bool("allow_non_finite", False, "Load weights that hold NaN or Inf (default: an "
                                      "error naming the file and tensor).")


def relative_error(ours, golden) -> float:
  return float(np.abs(np.asarray(ours, np.float32) - golden).max() / np.abs(golden).max())


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
  ids = golden.get("input_ids", np.random.randint(0, cfg.vocab_size, (1, _SEQ.value)))
  run = jax.jit(lambda p, x: functional.apply(cfg, p, x, attention=_ATTENTION.value))
  start = time.perf_counter()
  out = jax.block_until_ready(run(params, ids))
  print(f"forward {tuple(ids.shape)} -> logits {tuple(out.logits.shape)} in {time.perf_counter() - start:.1f}s "
        f"(with compilation), attention={_ATTENTION.value}")
  if not golden:
    print("no golden.npz next to the checkpoint: nothing to compare")
    return
  rows = [("logits", relative_error(out.logits, golden["logits"]), "")]
  for i in range(cfg.num_layers):
    hidden = golden.get(f"hidden_layer{i}")
    topk = golden.get(f"topk_indices_layer{i}")
    same = "" if topk is None or out.layer_aux[i].attention.topk_indices is None else (
        "identical" if np.array_equal(out.layer_aux[i].attention.topk_indices, topk) else "DIFFERENT")
    rows.append((f"layer {i}", relative_error(out.hidden_states[i], hidden) if hidden is not None else float("nan"),
                 same))
  print(f"\n{'output':<10} {'max |ours - HF| / max |HF|':>28}  top-k vs HF")
  for name, err, same in rows:
    print(f"{name:<10} {err:>28.2e}  {same}")


if __name__ == "__main__":
  app.run(main)
