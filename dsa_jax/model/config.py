"""Frozen, validated configurations of the DeepSeek-V3.2 model (spec section 1).

One dataclass per concern; each layer receives only the sub-config it needs. Derived sizes are
properties. Presets: `tiny` (CPU tests), `small` (one GPU), `v3_2_671b` (the official model,
`config_671B_v3.2.json`), `v3_2_layers` (a few layers of the official shapes, for one-GPU step benchmarks).
"""

import dataclasses
import math

from dsa_jax.validation import check_field, check_positive

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """YaRN rotary embedding (HF `rope_type: yarn`, official `precompute_freqs_cis`)."""
  theta: float = 10000.0
  factor: float = 40.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0

  def __post_init__(self):
    check_field(self.theta > 0, "RopeConfig.theta", self.theta, "> 0")
    check_field(self.factor >= 1, "RopeConfig.factor", self.factor, ">= 1 (1 disables YaRN)")
    check_positive(self, "original_max_position")

  @staticmethod
  def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

  @property
  def attention_factor(self) -> float:
    """Scale of cos/sin (HF `attention_factor`); 1.0 when mscale == mscale_all_dim, as in V3.2."""
    if self.mscale and self.mscale_all_dim:
      return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(self.factor, self.mscale_all_dim)
    return self.yarn_mscale(self.factor, 1.0)

  @property
  def softmax_mscale_sq(self) -> float:
    """Extra factor on the attention softmax scale: mscale(factor, mscale_all_dim)^2."""
    if not self.mscale_all_dim:
      return 1.0
    return self.yarn_mscale(self.factor, self.mscale_all_dim) ** 2


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Multi-head latent attention sizes (DeepSeek-V2 MLA, as used by V3/V3.2)."""
  num_heads: int = 128
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128

  def __post_init__(self):
    check_positive(self, "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim")
    check_field(self.qk_rope_head_dim % 2 == 0, "MLAConfig.qk_rope_head_dim", self.qk_rope_head_dim, "an even number")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def latent_dim(self) -> int:
    """Width of one shared MQA-mode entry [c | k_rope] (576 in V3.2)."""
    return self.kv_lora_rank + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class IndexerConfig:
  """Lightning indexer (paper section 2.1): I index heads of H dims, top-k selection."""
  num_heads: int = 64
  head_dim: int = 128
  topk: int = 2048

  def __post_init__(self):
    check_positive(self, "num_heads", "head_dim", "topk")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE with sigmoid routing, node-limited groups and aux-loss-free bias (V3 paper section 2.1.2)."""
  num_experts: int = 256
  experts_per_token: int = 8
  num_shared_experts: int = 1
  expert_hidden: int = 2048
  num_groups: int = 8
  topk_groups: int = 4
  routed_scaling_factor: float = 2.5
  norm_topk_prob: bool = True

  def __post_init__(self):
    check_positive(self, "num_experts", "experts_per_token", "expert_hidden", "num_groups", "topk_groups")
    check_field(self.num_shared_experts >= 0, "MoEConfig.num_shared_experts", self.num_shared_experts, ">= 0")
    check_field(self.num_experts % self.num_groups == 0, "MoEConfig.num_groups", self.num_groups,
           f"a divisor of num_experts={self.num_experts}")
    check_field(self.topk_groups <= self.num_groups, "MoEConfig.topk_groups", self.topk_groups,
           f"<= num_groups={self.num_groups}")
    per_group = self.num_experts // self.num_groups
    check_field(self.experts_per_token <= self.topk_groups * per_group, "MoEConfig.experts_per_token",
           self.experts_per_token, f"<= topk_groups * experts per group = {self.topk_groups * per_group}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The whole model. `indexer=None` gives a dense DeepSeek-V3 model (no DSA)."""
  vocab_size: int = 129280
  hidden_size: int = 7168
  num_layers: int = 61
  first_k_dense: int = 3
  dense_hidden: int = 18432
  rms_norm_eps: float = 1e-6
  max_position: int = 163840
  mla: MLAConfig = MLAConfig()
  indexer: IndexerConfig | None = IndexerConfig()
  moe: MoEConfig = MoEConfig()
  rope: RopeConfig = RopeConfig()
  num_mtp_layers: int = 1
  dtype: str = "bfloat16"
  param_dtype: str = "float32"

  def __post_init__(self):
    check_positive(self, "vocab_size", "hidden_size", "num_layers", "dense_hidden", "max_position")
    check_field(0 <= self.first_k_dense <= self.num_layers, "ModelConfig.first_k_dense", self.first_k_dense,
           f"0..num_layers={self.num_layers}")
    check_field(self.num_mtp_layers in (0, 1), "ModelConfig.num_mtp_layers", self.num_mtp_layers, "0 or 1")
    check_field(self.dtype in COMPUTE_DTYPES, "ModelConfig.dtype", self.dtype, str(COMPUTE_DTYPES))
    check_field(self.param_dtype in COMPUTE_DTYPES, "ModelConfig.param_dtype", self.param_dtype, str(COMPUTE_DTYPES))
    if self.indexer is not None:
      check_field(self.indexer.head_dim >= self.mla.qk_rope_head_dim, "IndexerConfig.head_dim", self.indexer.head_dim,
             f">= MLAConfig.qk_rope_head_dim={self.mla.qk_rope_head_dim} (the indexer's RoPE slice)")

  def is_moe_layer(self, layer: int) -> bool:
    return layer >= self.first_k_dense

  @property
  def softmax_scale(self) -> float:
    """MLA softmax scale: qk_head_dim^-0.5 x mscale^2 (0.1352338 for V3.2)."""
    return self.mla.qk_head_dim ** -0.5 * self.rope.softmax_mscale_sq

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def v3_2_671b() -> ModelConfig:
  """The official DeepSeek-V3.2 (config_671B_v3.2.json)."""
  return ModelConfig()


def v3_2_layers(moe_layers: int = 1) -> ModelConfig:
  """A few DeepSeek-V3.2 layers at their exact shapes: what one GPU of 8-way expert parallelism computes.

  Hidden 7168, MLA (128 heads, q rank 1536, kv rank 512, nope 128 / rope 64 / v 128), indexer 64 x 128 with
  top-2048, vocabulary 129,280, YaRN RoPE, one dense layer (MLP hidden 18432) then `moe_layers` MoE layers,
  no MTP. The MoE keeps the 256-expert model's per-token shapes (expert hidden 2048, top-8, one shared
  expert, sigmoid, routed scaling 2.5, top-4 of 8 groups) but holds only the 32 routed experts one GPU has
  under 8-way expert parallelism (8 groups of 4): per-token expert FLOPs and matmul shapes are the real
  ones, the router chooses among 32. Parameters are bf16: the state of these ~4.1B parameters with AdamW
  takes 8 B each (31 GiB) instead of 16 B (61 GiB) in float32, which would leave no room for 128K tokens.
  """
  base = ModelConfig()
  return base.replace(num_layers=1 + moe_layers, first_k_dense=1, num_mtp_layers=0, param_dtype="bfloat16",
                      moe=dataclasses.replace(base.moe, num_experts=32))


def small() -> ModelConfig:
  """A few hundred million parameters for one GPU; top-k 512 at 8K context; entry widths the GPU kernels take
  (latent 256 + rope 64, indexer 16 x 128)."""
  return ModelConfig(
      vocab_size=32768, hidden_size=1024, num_layers=12, first_k_dense=1, dense_hidden=2816, max_position=32768,
      mla=MLAConfig(num_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64,
                    v_head_dim=64),
      indexer=IndexerConfig(num_heads=16, head_dim=128, topk=512),
      moe=MoEConfig(num_experts=32, experts_per_token=4, num_shared_experts=1, expert_hidden=512, num_groups=4,
                    topk_groups=2),
      rope=RopeConfig(factor=4.0, original_max_position=8192))


def tiny() -> ModelConfig:
  """CPU-test size, the same shape family as the HF golden fixture."""
  return ModelConfig(
      vocab_size=512, hidden_size=64, num_layers=3, first_k_dense=1, dense_hidden=128, max_position=256,
      mla=MLAConfig(num_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16),
      indexer=IndexerConfig(num_heads=16, head_dim=16, topk=8),
      moe=MoEConfig(num_experts=8, experts_per_token=2, num_shared_experts=1, expert_hidden=32, num_groups=4,
                    topk_groups=2),
      rope=RopeConfig(factor=4.0, original_max_position=16), dtype="float32")


PRESETS = {"tiny": tiny, "small": small, "v3_2_671b": v3_2_671b, "v3_2_layers": v3_2_layers}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"preset={name!r} is unknown; allowed: {sorted(PRESETS)}.")
  return PRESETS[name]()
