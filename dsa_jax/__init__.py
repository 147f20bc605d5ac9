"""dsa_jax: DeepSeek-V3.2 (MLA, lightning indexer, DeepSeek Sparse Attention, DeepSeekMoE, MTP) in JAX.

Public API:
  load_hf(path, dtype=jnp.float32) -> (config, params)   an HF DeepSeek-V3.2 checkpoint directory (FP8 ok)
  forward(config, params, input_ids, attention="sparse" | "dense") -> logits [B, T, V]
  save_hf(path, config, params)                           export back to HF format
  init(config, seed) -> params;  apply(...) -> ModelOutput (logits, per-layer hidden states and aux)
  configs: ModelConfig, preset("tiny" | "small" | "v3_2_671b")
Subpackages: model, checkpoint, data, training, evaluation, rl, sampling, sharding, agent (`dsa_jax.rl.grpo_loss(...)`
and `dsa_jax.agent.parse.parse_completion(...)` work after a plain `import dsa_jax`).

Names, subpackages and their modules load on first access, so `import dsa_jax` imports no JAX; the agent's
chat, tool and rollout modules and `dsa_jax.data.tokenizer` need none either.
"""

import importlib
import importlib.util
import types
from collections.abc import Callable

_EXPORTS = {
    "load_hf": "dsa_jax.checkpoint.hf_convert", "save_hf": "dsa_jax.checkpoint.hf_convert",
    "forward": "dsa_jax.model", "apply": "dsa_jax.model", "init": "dsa_jax.model",
    "abstract_state": "dsa_jax.model", "count_params": "dsa_jax.model",
    "ModelConfig": "dsa_jax.model", "MLAConfig": "dsa_jax.model", "IndexerConfig": "dsa_jax.model",
    "MoEConfig": "dsa_jax.model", "RopeConfig": "dsa_jax.model", "preset": "dsa_jax.model",
}
_SUBPACKAGES = ("agent", "checkpoint", "data", "evaluation", "model", "rl", "sampling", "sharding", "training")
__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def submodules(package: str) -> Callable[[str], types.ModuleType]:
  """A module `__getattr__` for `package` that imports `package.name` on first access, so that a documented
  dotted name (`dsa_jax.agent.parse.parse_completion`) works as written after a plain `import dsa_jax`."""
  def getattr_(name: str) -> types.ModuleType:
    if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
      return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
  return getattr_


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  return submodules(__name__)(name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
