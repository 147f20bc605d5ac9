"""Generate text with the cached sampler and report tokens/s.

  python -m experiments.generate --prompt="sort:4132=" --max_new_tokens=32
  python -m experiments.generate --hf_path=tests/fixtures/hf_deepseek_v32_tiny --prompts_file=prompts.txt

Weights: an HF DeepSeek-V3.2 directory (`dsa_jax.load_hf`; its `tokenizer.json` is used when present), or a
random tiny model with the byte tokenizer. Prompts: --prompt (repeatable) or --prompts_file (one a line).
The first call compiles; the reported throughput is from a second, timed call.
"""

import pathlib
import time

import jax
from absl import app, flags

import dsa_jax
from dsa_jax.data.tokenizer import ByteTokenizer, HFTokenizer, check_vocab_fits
from dsa_jax.model import functional
from dsa_jax.model.config import tiny
from dsa_jax.rl.rollout import completion_text
from dsa_jax.sampling import SamplingConfig, generate, left_pad

_HF_PATH = flags.DEFINE_string("hf_path", None, "HF checkpoint directory; default: a random tiny model.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["Hello"], "Prompt text (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt a line (overrides --prompt).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Top-p (model card default 0.95).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k (None: K_max caps the set).")
_K_MAX = flags.DEFINE_integer("k_max", 64, "Width of the recorded kept set.")
_ATTENTION = flags.DEFINE_enum("attention", "sparse", ["sparse", "dense"], "DSA or dense attention.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _model():
  if _HF_PATH.value is None:
    tokenizer = ByteTokenizer()
    cfg = tiny().replace(vocab_size=tokenizer.vocab_size, num_mtp_layers=0)
    return cfg, functional.init(cfg, 0), tokenizer
  cfg, params = dsa_jax.load_hf(_HF_PATH.value, include_mtp=False)
  tokenizer_json = pathlib.Path(_HF_PATH.value) / "tokenizer.json"
  return cfg, params, HFTokenizer(tokenizer_json) if tokenizer_json.exists() else ByteTokenizer()


def main(argv):
  del argv
  cfg, params, tokenizer = _model()
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
  jax.block_until_ready(generate(cfg, params, ids, lengths, rng, sampling))  # compile
  start = time.perf_counter()
  out = jax.block_until_ready(generate(cfg, params, ids, lengths, rng, sampling))
  seconds = time.perf_counter() - start
  for text, tokens, mask in zip(texts, jax.device_get(out.tokens), jax.device_get(out.mask)):
    ids = [int(t) for t, m in zip(tokens, mask) if m]
    # A model whose vocabulary is wider than the byte tokenizer's (the HF test fixture) prints raw ids.
    shown = completion_text(tokenizer, tokens, mask) if max(ids, default=0) < tokenizer.vocab_size else ids
    print(f"{text!r} -> {shown!r}")
  n = int(out.mask.sum())
  print(f"{n} tokens in {seconds:.3f}s: {n / seconds:.1f} tokens/s (batch {len(texts)}, {jax.devices()[0].platform})")


if __name__ == "__main__":
  app.run(main)
