"""The DeepSeek-V3.2 model (Flax NNX): MLA with the lightning indexer and DeepSeek Sparse Attention, DeepSeekMoE,
multi-token prediction; as pure functions of a parameter pytree (`init`, `apply`, `forward`).

Dimension letters, used in einsum strings, shape comments and sharding spec names (V3.2's sizes in brackets):
  B batch                  T query positions              S key positions
  D model width (7168)     N attention heads (128)        H head dim (128; MLA q/k heads: 128 nope + 64 rope)
  C latent rank (512)      R rope dims (64)               K top-k (2048)
  I index heads (64)       E routed experts (256)         F expert hidden (2048)
  V vocab (129280)

Per-layer outputs (`ModelOutput.layer_aux`, one `LayerAux` per layer): `AttentionAux` (log-sum-exp, MQA
operands, top-k indices, indexer inputs, decode cache) and, in MoE layers, `MoEAux` (experts and scores);
a field is None where it does not apply.
"""

from dsa_jax import submodules
from dsa_jax.model.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig, preset
from dsa_jax.model.functional import abstract_state, apply, count_params, forward, init
from dsa_jax.model.indexer import IndexerInputs
from dsa_jax.model.kv_cache import KVCache, LayerCache, init_cache
from dsa_jax.model.mla import AttentionAux, AttentionOptions, MQAOperands, TokenLayout
from dsa_jax.model.moe import ExpertDispatch, MoEAux
from dsa_jax.model.paged_cache import PageAllocator, PagedKVCache, init_paged_cache
from dsa_jax.model.transformer import LayerAux, ModelOutput

__all__ = [
    "AttentionAux",
    "AttentionOptions",
    "ExpertDispatch",
    "IndexerConfig",
    "IndexerInputs",
    "KVCache",
    "LayerAux",
    "LayerCache",
    "MLAConfig",
    "MQAOperands",
    "ModelConfig",
    "ModelOutput",
    "MoEAux",
    "MoEConfig",
    "PageAllocator",
    "PagedKVCache",
    "RopeConfig",
    "TokenLayout",
    "abstract_state",
    "apply",
    "count_params",
    "forward",
    "init",
    "init_cache",
    "init_paged_cache",
    "preset",
]

__getattr__ = submodules(__name__)  # dsa_jax.model.<module> after a plain `import dsa_jax`
