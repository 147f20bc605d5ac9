"""HuggingFace `config.json` <-> ModelConfig.

Accepts `model_type` "deepseek_v32" (with indexer fields) and "deepseek_v3" (no indexer: a dense model).
Reads RoPE from HF 5.x `rope_parameters` or the official `rope_theta` + `rope_scaling`.
config.json is untrusted input: every field we read is checked for type and range (`FIELDS`) before any work, and
errors are one-line `CheckpointError`s naming the file, the field, the value and what is allowed.
"""

import math
import pathlib
from typing import Any

from dsa_jax.checkpoint.safetensors_io import inside, is_int, naming, read_json
from dsa_jax.model.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from dsa_jax.validation import check_field

MODEL_TYPES = ("deepseek_v32", "deepseek_v3")
# Type and allowed interval of every number we read (V3.2's value after #). The upper bounds are far above any
# released model and there to stop a typo (1e6 experts, 610 layers) before it costs minutes and gigabytes.
FIELDS = {
    "vocab_size": (int, "[1, 4194304]"),  # 129280
    "hidden_size": (int, "[1, 65536]"),  # 7168
    "num_hidden_layers": (int, "[1, 1024]"),  # 61
    "first_k_dense_replace": (int, "[0, 1024]"),  # 3
    "intermediate_size": (int, "[1, 1048576]"),  # 18432
    "max_position_embeddings": (int, "[1, 16777216]"),  # 163840
    "num_attention_heads": (int, "[1, 1024]"),  # 128
    "num_key_value_heads": (int, "[1, 1024]"),  # 128
    "q_lora_rank": (int, "[1, 65536]"),  # 1536
    "kv_lora_rank": (int, "[1, 65536]"),  # 512
    "qk_nope_head_dim": (int, "[1, 4096]"),  # 128
    "qk_rope_head_dim": (int, "[1, 4096]"),  # 64
    "v_head_dim": (int, "[1, 4096]"),  # 128
    "index_n_heads": (int, "[1, 1024]"),  # 64
    "index_head_dim": (int, "[1, 4096]"),  # 128
    "index_topk": (int, "[1, 16777216]"),  # 2048
    "n_routed_experts": (int, "[1, 4096]"),  # 256
    "num_experts_per_tok": (int, "[1, 4096]"),  # 8
    "n_shared_experts": (int, "[0, 64]"),  # 1
    "moe_intermediate_size": (int, "[1, 1048576]"),  # 2048
    "n_group": (int, "[1, 4096]"),  # 8
    "topk_group": (int, "[1, 4096]"),  # 4
    "num_nextn_predict_layers": (int, "[0, 1]"),  # 1 (this port loads at most one MTP layer)
    "rms_norm_eps": (float, "(0, 1]"),  # 1e-6
    "routed_scaling_factor": (float, "(0, 1000]"),  # 2.5
    "rope_theta": (float, "(0, 1e12]"),  # 10000
    # inside rope_parameters (HF 5.x) or rope_scaling (official)
    "factor": (float, "[1, 1e6]"),  # 40
    "original_max_position_embeddings": (int, "[1, 16777216]"),  # 4096
    "beta_fast": (float, "[0, 1e4]"),  # 32
    "beta_slow": (float, "[0, 1e4]"),  # 1
    "mscale": (float, "[0, 1000]"),  # 1
    "mscale_all_dim": (float, "[0, 1000]"),  # 1
}
_REQUIRED = object()


def _field(hf: dict, key: str, default: Any = _REQUIRED, where: str = "") -> Any:
  """hf[key] checked against FIELDS[key]; `default` where it is absent or null (an error where there is none)."""
  value = hf.get(key)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"{where}{key} is missing or null; it is required for DeepSeek-V3/V3.2.")
    return default
  kind, interval = FIELDS[key]
  low, high = (float(x) for x in interval[1:-1].split(","))
  ok = is_int(value, -math.inf) or (kind is float and isinstance(value, float) and math.isfinite(value))
  ok = ok and value <= high and (value > low if interval[0] == "(" else value >= low)
  check_field(ok, where + key, value, f"{'an integer' if kind is int else 'a finite number'} in {interval}")
  return kind(value)


def _flag(hf: dict, key: str, default: bool) -> bool:
  value = default if hf.get(key) is None else hf[key]
  check_field(isinstance(value, bool), key, value, "true or false")
  return value


def _expect(hf: dict, key: str, allowed: tuple) -> None:
  if key in hf and hf[key] not in allowed:
    raise ValueError(f"HF config {key}={hf[key]!r:.100} is not supported; allowed: {allowed}.")


def _rope(hf: dict) -> RopeConfig:
  source = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  params = hf.get(source) or {}
  check_field(isinstance(params, dict), source, params, "an object")
  where = source + "."
  theta = _field(params, "rope_theta", _field(hf, "rope_theta", 10000.0), where)
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("yarn", "default"):
    raise ValueError(f"HF config rope type={kind!r:.100} is not supported; allowed: ('yarn', 'default').")
  if kind == "default":
    return RopeConfig(theta=theta, factor=1.0, original_max_position=_field(hf, "max_position_embeddings", 4096))
  return RopeConfig(theta=theta, factor=_field(params, "factor", where=where),
                    original_max_position=_field(params, "original_max_position_embeddings", where=where),
                    beta_fast=_field(params, "beta_fast", 0.0, where) or 32.0,
                    beta_slow=_field(params, "beta_slow", 0.0, where) or 1.0,
                    mscale=_field(params, "mscale", 1.0, where),
                    mscale_all_dim=_field(params, "mscale_all_dim", 0.0, where))


def _first_k_dense(hf: dict, layers: int) -> int:
  first_k = _field(hf, "first_k_dense_replace", 0)
  kinds = hf.get("mlp_layer_types")
  if kinds is not None:
    check_field(isinstance(kinds, list) and len(kinds) == layers and all(k in ("dense", "sparse") for k in kinds),
                "mlp_layer_types", kinds, f"a list of {layers} (num_hidden_layers) 'dense' or 'sparse'")
    first_k = kinds.count("dense")
    if kinds != ["dense"] * first_k + ["sparse"] * (layers - first_k):
      raise ValueError(f"HF config mlp_layer_types={kinds} is not supported; allowed: dense layers first, then "
                       "sparse (MoE) layers.")
  return first_k


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
  """A ModelConfig from the dict of an HF config.json; `dtype` sets compute and parameter dtype."""
  _expect(hf, "model_type", MODEL_TYPES)
  _expect(hf, "scoring_func", ("sigmoid",))
  _expect(hf, "hidden_act", ("silu",))
  heads = _field(hf, "num_attention_heads")
  if _field(hf, "num_key_value_heads", heads) != heads:
    raise ValueError(f"HF config num_key_value_heads={hf['num_key_value_heads']} is not supported; allowed: "
                     f"num_attention_heads={heads} (MLA has no grouped KV heads).")
  indexer = None
  if hf.get("model_type", "deepseek_v32") == "deepseek_v32" and "index_topk" in hf:
    indexer = IndexerConfig(num_heads=_field(hf, "index_n_heads"), head_dim=_field(hf, "index_head_dim"),
                            topk=_field(hf, "index_topk"))
  layers = _field(hf, "num_hidden_layers")
  return ModelConfig(
      vocab_size=_field(hf, "vocab_size"), hidden_size=_field(hf, "hidden_size"),
      num_layers=layers, first_k_dense=_first_k_dense(hf, layers),
      dense_hidden=_field(hf, "intermediate_size"), rms_norm_eps=_field(hf, "rms_norm_eps", 1e-6),
      max_position=_field(hf, "max_position_embeddings", 163840),
      mla=MLAConfig(num_heads=heads, q_lora_rank=_field(hf, "q_lora_rank"), kv_lora_rank=_field(hf, "kv_lora_rank"),
                    qk_nope_head_dim=_field(hf, "qk_nope_head_dim"), qk_rope_head_dim=_field(hf, "qk_rope_head_dim"),
                    v_head_dim=_field(hf, "v_head_dim")),
      indexer=indexer,
      moe=MoEConfig(num_experts=_field(hf, "n_routed_experts"), experts_per_token=_field(hf, "num_experts_per_tok"),
                    num_shared_experts=_field(hf, "n_shared_experts", 0),
                    expert_hidden=_field(hf, "moe_intermediate_size"), num_groups=_field(hf, "n_group", 1),
                    topk_groups=_field(hf, "topk_group", 1),
                    routed_scaling_factor=_field(hf, "routed_scaling_factor", 1.0),
                    norm_topk_prob=_flag(hf, "norm_topk_prob", True)),
      rope=_rope(hf), num_mtp_layers=_field(hf, "num_nextn_predict_layers", 0), dtype=dtype, param_dtype=dtype)


def read_hf(path: str | pathlib.Path) -> dict:
  """The dict of `path/config.json`, read as untrusted input (a regular file inside `path`, a JSON object)."""
  path = pathlib.Path(path)
  return read_json(inside(path, "config.json", path))


def read_config(path: str | pathlib.Path, dtype: str = "float32") -> ModelConfig:
  hf = read_hf(path)
  with naming(pathlib.Path(path) / "config.json"):
    return config_from_hf(hf, dtype)


def read_block_size(path: str | pathlib.Path) -> tuple[int, int]:
  """FP8 tile [rows, cols] of `weight_scale_inv` (`quantization_config.weight_block_size`, default 128 x 128)."""
  quant = read_hf(path).get("quantization_config") or {}
  with naming(pathlib.Path(path) / "config.json"):
    check_field(isinstance(quant, dict), "quantization_config", quant, "an object")
    block = quant.get("weight_block_size", [128, 128])
    check_field(isinstance(block, list) and len(block) == 2 and all(is_int(b, 1) for b in block),
                "quantization_config.weight_block_size", block, "two positive integers [rows, cols]")
  return tuple(block)


def config_to_hf(cfg: ModelConfig) -> dict:
  """An HF config.json dict (HF 5.x field names, plus the official `num_nextn_predict_layers`)."""
  mla, moe, rope = cfg.mla, cfg.moe, cfg.rope
  hf = {
      "architectures": ["DeepseekV32ForCausalLM" if cfg.indexer else "DeepseekV3ForCausalLM"],
      "model_type": "deepseek_v32" if cfg.indexer else "deepseek_v3",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "first_k_dense_replace": cfg.first_k_dense, "intermediate_size": cfg.dense_hidden,
      "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position, "hidden_act": "silu",
      "num_attention_heads": mla.num_heads, "num_key_value_heads": mla.num_heads, "q_lora_rank": mla.q_lora_rank,
      "kv_lora_rank": mla.kv_lora_rank, "qk_nope_head_dim": mla.qk_nope_head_dim,
      "qk_rope_head_dim": mla.qk_rope_head_dim, "v_head_dim": mla.v_head_dim,
      "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.experts_per_token,
      "n_shared_experts": moe.num_shared_experts, "moe_intermediate_size": moe.expert_hidden,
      "n_group": moe.num_groups, "topk_group": moe.topk_groups, "routed_scaling_factor": moe.routed_scaling_factor,
      "norm_topk_prob": moe.norm_topk_prob, "scoring_func": "sigmoid", "tie_word_embeddings": False,
      "num_nextn_predict_layers": cfg.num_mtp_layers,
      "rope_parameters": {"rope_type": "yarn" if rope.factor > 1 else "default", "rope_theta": rope.theta,
                          "factor": rope.factor, "original_max_position_embeddings": rope.original_max_position,
                          "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow, "mscale": rope.mscale,
                          "mscale_all_dim": rope.mscale_all_dim},
  }
  if cfg.indexer:
    hf.update(index_n_heads=cfg.indexer.num_heads, index_head_dim=cfg.indexer.head_dim, index_topk=cfg.indexer.topk)
  return hf
