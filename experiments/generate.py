"""Generate text with the cached sampler and report tokens/s.

  python -m experiments.generate --run_dir=runs/dsa_tiny_<time> --prompt="def " --temperature=0
  python -m experiments.generate --hf_path=deepseek-ai/DeepSeek-V3.2 --local_files_only --prompt=Hello
  python -m experiments.generate --prompt="sort:4132=" --max_new_tokens=32    # a random tiny model

Weights: a training run's HF export (`--run_dir`: `<run_dir>/hf`, written by `train_dsa` with
`--config.train.export_hf=true`, on in the tiny config, and by `train_grpo --export_hf`), an HF DeepSeek-V3.2
directory or hub id (`--hf_path`, through the HF cache; `--local_files_only` reads the cache only), or a random
tiny model with the byte tokenizer. The checkpoint's tokenizer (`tokenizer.json`) encodes the prompts and
decodes the output; without one, prompts are byte tokens and the output is printed as ids. Temperature 0 is
greedy decoding. Prompts: --prompt (repeatable) or --prompts_file (one a line). The first call compiles; the
reported throughput is the median of --repeats timed calls.

--speculative also decodes with the MTP block as a one-token draft (`dsa_jax.sampling.speculative`; the
checkpoint's MTP layer is loaded) and prints, measured in the same run, tokens/s of plain and speculative
decoding, the draft acceptance rate, tokens per verification step and whether the tokens equal plain decoding's.
"""

import pathlib
import sys
import time

import jax
from absl import app, flags

import dsa_jax
from dsa_jax.checkpoint import hub
from dsa_jax.checkpoint.hf_config import read_config
from dsa_jax.data.tokenizer import ByteTokenizer, check_vocab_fits, from_checkpoint
from dsa_jax.model import functional
from dsa_jax.model.config import tiny
from dsa_jax.rl.rollout import completion_text
from dsa_jax.sampling import SamplingConfig, generate, left_pad, speculative
from experiments import cli

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A training run directory: generate with its HF export <run_dir>/hf.")
_HF_PATH = flags.DEFINE_string("hf_path", None, "HF checkpoint directory or hub id; default: a random tiny model.")
_LOCAL_ONLY = flags.DEFINE_bool("local_files_only", False, "Hub ids: read the HF cache only, never download.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Hub ids: the HF cache directory (default: HF_HUB_CACHE).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["Hello"], "Prompt text (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt a line (overrides --prompt).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0: greedy (argmax).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Top-p (model card default 0.95).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k (None: K_max caps the set).")
_K_MAX = flags.DEFINE_integer("k_max", 64, "Width of the recorded kept set.")
_ATTENTION = flags.DEFINE_enum("attention", "sparse", ["sparse", "dense"], "DSA or dense attention.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Also decode with MTP drafts: plain vs speculative tokens/s "
                                 "and the acceptance rate (module docstring).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per decoder (after the compiling one); the median counts.",
                                lower_bound=1)


def _checkpoint_dir() -> pathlib.Path | None:
  """The HF checkpoint directory the flags name, or None for a random model."""
  if _RUN_DIR.value is not None:
    path = pathlib.Path(_RUN_DIR.value) / "hf"
    if not (path / "config.json").is_file():
      sys.exit(f"generate: --run_dir={_RUN_DIR.value} has no HF export {path}; allowed: a run trained with "
               f"export_hf (rerun train_dsa with --config.run_dir={_RUN_DIR.value} --config.train.export_hf=true: "
               "finished stages are skipped, then it exports).")
    return path
  if _HF_PATH.value is None:
    return None
  return hub.local_dir(_HF_PATH.value, local_files_only=_LOCAL_ONLY.value, cache_dir=_CACHE_DIR.value)


def _model():
  """(config, params, tokenizer, whether the tokenizer is the checkpoint's own)."""
  path = _checkpoint_dir()
  if path is None:
    tokenizer = ByteTokenizer()
    cfg = tiny().replace(vocab_size=tokenizer.vocab_size, num_mtp_layers=int(_SPECULATIVE.value))
    return cfg, functional.init(cfg, 0), tokenizer, True
  if _SPECULATIVE.value and not read_config(path).num_mtp_layers:
    sys.exit(f"generate: --speculative needs the MTP layer, but {path} has none (config.json "
             "num_nextn_predict_layers=0); allowed: a checkpoint with num_nextn_predict_layers=1.")
  cfg, params = dsa_jax.load_hf(path, include_mtp=_SPECULATIVE.value)
  tokenizer = from_checkpoint(path)
  return cfg, params, tokenizer or ByteTokenizer(), tokenizer is not None


def main(argv):
  del argv
  cfg, params, tokenizer, known = _model()
  check_vocab_fits(tokenizer, cfg.vocab_size, "the model's vocab_size")
  texts = (pathlib.Path(_PROMPTS_FILE.value).read_text().splitlines() if _PROMPTS_FILE.value else _PROMPT.value)
  texts = [t for t in texts if t]
  if not texts:
    raise app.UsageError("no prompt: give --prompt or a non-empty --prompts_file.")
  encoded = [tokenizer.encode(t) for t in texts]
  ids, lengths = left_pad(encoded, max(len(e) for e in encoded), tokenizer.pad_id)
  sampling = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                            top_k=_TOP_K.value, k_max=_K_MAX.value, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                            attention=_ATTENTION.value)
  rng = jax.random.key(_SEED.value)
  out, seconds = _timed(lambda: generate(cfg, params, ids, lengths, rng, sampling))
  for text, tokens, mask in zip(texts, jax.device_get(out.tokens), jax.device_get(out.mask)):
    # Without the checkpoint's tokenizer (the HF test fixture ships none) the ids are all we can show.
    shown = completion_text(tokenizer, tokens, mask) if known else [int(t) for t, m in zip(tokens, mask) if m]
    print(f"{text!r} -> {shown!r}")
  n = int(out.mask.sum())
  device = f"batch {len(texts)}, {jax.devices()[0].platform}, median of {_REPEATS.value}"
  print(f"plain: {n} tokens in {seconds:.3f}s: {n / seconds:.1f} tokens/s ({device})")
  if _SPECULATIVE.value:
    spec, spec_seconds = _timed(lambda: speculative.generate(cfg, params, ids, lengths, rng, sampling))
    spec_n = int(spec.mask.sum())
    same = bool((spec.tokens == out.tokens).all() & (spec.mask == out.mask).all())
    print(f"speculative: {spec_n} tokens in {spec_seconds:.3f}s: {spec_n / spec_seconds:.1f} tokens/s ({device}); "
          f"speed-up {seconds / n * spec_n / spec_seconds:.2f}x; acceptance {float(spec.acceptance_rate):.3f} "
          f"({int(spec.accepted.sum())}/{int(spec.drafts.sum())} drafts, {int(spec.steps)} verification steps); "
          f"tokens {'equal' if same else 'differ from'} plain decoding's")


def _timed(call):
  """(output, median seconds of --repeats calls) after one compiling call."""
  jax.block_until_ready(call())
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return out, sorted(times)[len(times) // 2]


if __name__ == "__main__":
  cli.run(main)
