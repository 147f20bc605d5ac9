"""dsa_jax: DeepSeek-V3.2 (MLA, lightning indexer, DeepSeek Sparse Attention, DeepSeekMoE, MTP) in JAX.

Public API:
  load_hf(path, dtype=jnp.float32) -> (config, params)   an HF DeepSeek-V3.2 checkpoint directory (FP8 ok)
  forward(config, params, input_ids, attention="sparse" | "dense") -> logits [B, T, V]
  save_hf(path, config, params)                           export back to HF format
  init(config, seed) -> params;  apply(...) -> ModelOutput (logits, per-layer hidden states and aux)
  configs: ModelConfig, preset("tiny" | "small" | "v3_2_671b")
"""

from dsa_jax.checkpoint.hf_convert import load_hf, save_hf
from dsa_jax.model.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig, preset
from dsa_jax.model.functional import abstract_state, apply, count_params, forward, init

__all__ = ["load_hf", "save_hf", "forward", "apply", "init", "abstract_state", "count_params", "ModelConfig",
           "MLAConfig", "IndexerConfig", "MoEConfig", "RopeConfig", "preset"]
