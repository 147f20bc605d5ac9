"""dsa_jax: DeepSeek-V3.2 (MLA, lightning indexer, DeepSeek Sparse Attention, DeepSeekMoE, MTP) in JAX.

Public API:
  load_hf(path, dtype=jnp.float32) -> (config, params)   an HF DeepSeek-V3.2 checkpoint directory (FP8 ok)
  forward(config, params, input_ids, attention="sparse" | "dense") -> logits [B, T, V]
  save_hf(path, config, params)                           export back to HF format
  init(config, seed) -> params;  apply(...) -> ModelOutput (logits, per-layer hidden states and aux)
  configs: ModelConfig, preset("tiny" | "small" | "v3_2_671b")
Subpackages: model, checkpoint, data, training, evaluation, rl, sampling, sharding, agent (`dsa_jax.rl.grpo_loss(...)`
works after a plain `import dsa_jax`).

Names and subpackages load on first access, so `import dsa_jax` imports no JAX; the agent's chat, tool and
rollout modules and `dsa_jax.data.tokenizer` need none either.
"""

import importlib

_EXPORTS = {
    "load_hf": "dsa_jax.checkpoint.hf_convert", "save_hf": "dsa_jax.checkpoint.hf_convert",
    "forward": "dsa_jax.model", "apply": "dsa_jax.model", "init": "dsa_jax.model",
    "abstract_state": "dsa_jax.model", "count_params": "dsa_jax.model",
    "ModelConfig": "dsa_jax.model", "MLAConfig": "dsa_jax.model", "IndexerConfig": "dsa_jax.model",
    "MoEConfig": "dsa_jax.model", "RopeConfig": "dsa_jax.model", "preset": "dsa_jax.model",
}
_SUBPACKAGES = ("agent", "checkpoint", "data", "evaluation", "model", "rl", "sampling", "sharding", "training")
__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  if name in _SUBPACKAGES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module 'dsa_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
