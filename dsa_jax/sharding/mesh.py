"""The device mesh: five named axes, validated against the devices and the shapes they shard.

Axes (any may be 1), outermost first so that the innermost, most talkative axes stay inside one host's
NVLink domain when devices are listed host by host (JAX docs, "Distributed arrays and automatic
parallelization"; the scaling-book recipe of FSDP x EP x CP x TP):
  data    - pure data parallelism: replicated parameters, different sequences;
  fsdp    - data parallelism with parameters and optimizer state sharded over it (ZeRO-3);
  expert  - routed experts sharded over it (tokens also split over it outside the MoE);
  context - the sequence axis of one long sequence (context parallelism);
  tensor  - attention heads, MLP hidden and vocabulary (Megatron-style tensor parallelism).
"""

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from dsa_jax.model.config import ModelConfig
from dsa_jax.validation import check_field

AXES = ("data", "fsdp", "expert", "context", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the five mesh axes; the product must equal the device count."""
  data: int = 1
  fsdp: int = 1
  expert: int = 1
  context: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in AXES:
      value = getattr(self, name)
      check_field(isinstance(value, int) and value > 0, f"MeshConfig.{name}", value, "a positive integer")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in AXES)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def batch_shards(self) -> int:
    """How many ways the batch is split (data x fsdp x expert)."""
    return self.data * self.fsdp * self.expert

  def validate_devices(self, num_devices: int) -> None:
    check_field(self.size == num_devices, "MeshConfig", self.shape,
             f"axis sizes {dict(zip(AXES, self.shape))} whose product equals the device count {num_devices}")

  def validate_model(self, cfg: ModelConfig) -> None:
    """Each axis must divide every parameter dimension it shards (see `rules.RULES`)."""
    for what, size in (("hidden_size", cfg.hidden_size), ("mla.q_lora_rank", cfg.mla.q_lora_rank),
                       ("mla.kv_lora_rank", cfg.mla.kv_lora_rank)):
      check_field(size % (self.fsdp * self.context * self.expert) == 0, "MeshConfig.fsdp", self.fsdp,
               f"fsdp*context*expert a divisor of {what}={size} (context={self.context}, expert={self.expert})")
    check_field(cfg.moe.num_experts % self.expert == 0, "MeshConfig.expert", self.expert,
             f"a divisor of moe.num_experts={cfg.moe.num_experts}")
    check_field(cfg.mla.num_heads % self.tensor == 0, "MeshConfig.tensor", self.tensor,
             f"a divisor of mla.num_heads={cfg.mla.num_heads}")
    for what, size in (("vocab_size", cfg.vocab_size), ("dense_hidden", cfg.dense_hidden),
                       ("moe.expert_hidden", cfg.moe.expert_hidden)):
      check_field(size % self.tensor == 0, "MeshConfig.tensor", self.tensor, f"a divisor of {what}={size}")
    if cfg.indexer is not None:
      check_field(cfg.indexer.num_heads % self.tensor == 0, "MeshConfig.tensor", self.tensor,
               f"a divisor of indexer.num_heads={cfg.indexer.num_heads}")

  def validate_batch(self, batch: int, seq_len: int) -> None:
    """The batch splits over data x fsdp x expert; the sequence into 2 x context load-balanced chunks."""
    check_field(batch % self.batch_shards == 0, "batch", batch,
             f"a multiple of data*fsdp*expert={self.batch_shards}")
    chunks = 2 * self.context if self.context > 1 else 1
    check_field(seq_len % chunks == 0, "seq_len", seq_len, f"a multiple of 2*context={chunks}")


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A concrete mesh over `devices` (default: all), with Auto axes so GSPMD propagates shardings."""
  devices = jax.devices() if devices is None else list(devices)
  mesh_cfg.validate_devices(len(devices))
  return Mesh(np.asarray(devices).reshape(mesh_cfg.shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def make_abstract_mesh(mesh_cfg: MeshConfig) -> AbstractMesh:
  """A mesh of abstract devices (no hardware): for memory plans and cross-lowering."""
  return AbstractMesh(mesh_cfg.shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
