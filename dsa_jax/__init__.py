"""dsa_jax: DeepSeek-V3.2 (MLA, lightning indexer, DeepSeek Sparse Attention, DeepSeekMoE, MTP) in JAX.

Public API:
  load_hf(path, dtype=jnp.float32) -> (config, params)   an HF DeepSeek-V3.2 checkpoint directory (FP8 ok)
  forward(config, params, input_ids, attention="sparse" | "dense") -> logits [B, T, V]
  save_hf(path, config, params)                           export back to HF format
  init(config, seed) -> params;  apply(...) -> ModelOutput (logits, per-layer hidden states and aux)
  configs: ModelConfig, preset("tiny" | "small" | "v3_2_671b")
Subpackages: model, checkpoint, data, training, rl, agent.

Names load lazily, so `dsa_jax.agent` and `dsa_jax.data` import without JAX.
"""

import importlib

_EXPORTS = {
    "load_hf": "dsa_jax.checkpoint.hf_convert", "save_hf": "dsa_jax.checkpoint.hf_convert",
    "forward": "dsa_jax.model.functional", "apply": "dsa_jax.model.functional", "init": "dsa_jax.model.functional",
    "abstract_state": "dsa_jax.model.functional", "count_params": "dsa_jax.model.functional",
    "ModelConfig": "dsa_jax.model.config", "MLAConfig": "dsa_jax.model.config",
    "IndexerConfig": "dsa_jax.model.config", "MoEConfig": "dsa_jax.model.config",
    "RopeConfig": "dsa_jax.model.config", "preset": "dsa_jax.model.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'dsa_jax' has no attribute {name!r}")
