"""HuggingFace `config.json` <-> ModelConfig.

Accepts `model_type` "deepseek_v32" (with indexer fields) and "deepseek_v3" (no indexer: a dense model).
Reads RoPE from HF 5.x `rope_parameters` or the official `rope_theta` + `rope_scaling`.
"""

import json
import pathlib
from typing import Any

from dsa_jax.model.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig

MODEL_TYPES = ("deepseek_v32", "deepseek_v3")


def _require(hf: dict, key: str) -> Any:
  if key not in hf or hf[key] is None:
    raise ValueError(f"HF config field {key!r} is missing or null; it is required for DeepSeek-V3/V3.2.")
  return hf[key]


def _expect(hf: dict, key: str, allowed: tuple) -> None:
  if key in hf and hf[key] not in allowed:
    raise ValueError(f"HF config {key}={hf[key]!r} is not supported; allowed: {allowed}.")


def _rope(hf: dict) -> RopeConfig:
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("yarn", "default"):
    raise ValueError(f"HF config rope type={kind!r} is not supported; allowed: ('yarn', 'default').")
  if kind == "default":
    return RopeConfig(theta=theta, factor=1.0, original_max_position=hf.get("max_position_embeddings", 4096))
  return RopeConfig(theta=theta, factor=params["factor"],
                    original_max_position=params["original_max_position_embeddings"],
                    beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
                    mscale=params.get("mscale", 1.0), mscale_all_dim=params.get("mscale_all_dim", 0.0))


def _first_k_dense(hf: dict) -> int:
  first_k = hf.get("first_k_dense_replace", 0)
  kinds = hf.get("mlp_layer_types")
  if kinds is not None:
    first_k = kinds.count("dense")
    expected = ["dense"] * first_k + ["sparse"] * (len(kinds) - first_k)
    if kinds != expected:
      raise ValueError(f"HF config mlp_layer_types={kinds} is not supported; allowed: dense layers first, then "
                       "sparse (MoE) layers.")
  return first_k


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
  """A ModelConfig from the dict of an HF config.json; `dtype` sets compute and parameter dtype."""
  _expect(hf, "model_type", MODEL_TYPES)
  _expect(hf, "scoring_func", ("sigmoid",))
  _expect(hf, "hidden_act", ("silu",))
  heads = _require(hf, "num_attention_heads")
  if hf.get("num_key_value_heads", heads) != heads:
    raise ValueError(f"HF config num_key_value_heads={hf['num_key_value_heads']} is not supported; allowed: "
                     f"num_attention_heads={heads} (MLA has no grouped KV heads).")
  indexer = None
  if hf.get("model_type", "deepseek_v32") == "deepseek_v32" and "index_topk" in hf:
    indexer = IndexerConfig(num_heads=_require(hf, "index_n_heads"), head_dim=_require(hf, "index_head_dim"),
                            topk=_require(hf, "index_topk"))
  return ModelConfig(
      vocab_size=_require(hf, "vocab_size"), hidden_size=_require(hf, "hidden_size"),
      num_layers=_require(hf, "num_hidden_layers"), first_k_dense=_first_k_dense(hf),
      dense_hidden=_require(hf, "intermediate_size"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_position=hf.get("max_position_embeddings", 163840),
      mla=MLAConfig(num_heads=heads, q_lora_rank=_require(hf, "q_lora_rank"),
                    kv_lora_rank=_require(hf, "kv_lora_rank"), qk_nope_head_dim=_require(hf, "qk_nope_head_dim"),
                    qk_rope_head_dim=_require(hf, "qk_rope_head_dim"), v_head_dim=_require(hf, "v_head_dim")),
      indexer=indexer,
      moe=MoEConfig(num_experts=_require(hf, "n_routed_experts"), experts_per_token=_require(hf, "num_experts_per_tok"),
                    num_shared_experts=hf.get("n_shared_experts") or 0,
                    expert_hidden=_require(hf, "moe_intermediate_size"), num_groups=hf.get("n_group") or 1,
                    topk_groups=hf.get("topk_group") or 1,
                    routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                    norm_topk_prob=hf.get("norm_topk_prob", True)),
      rope=_rope(hf), num_mtp_layers=hf.get("num_nextn_predict_layers", 0), dtype=dtype, param_dtype=dtype)


def read_config(path: str | pathlib.Path, dtype: str = "float32") -> ModelConfig:
  hf = json.loads((pathlib.Path(path) / "config.json").read_text())
  return config_from_hf(hf, dtype)


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
