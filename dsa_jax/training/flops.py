"""Model FLOPs per token of each stage, for MFU, counting the indexer and sparse attention honestly.

Per token (multiply-add = 2 FLOPs; T the row length, S = (T + 1) / 2 the mean causal key count,
K = min(top-k, S); N heads, I index heads, H index dim, C latent rank, R rope dims, P / Vh nope / value dims):
  projections  2 x active parameters (routed experts count k/E of theirs; the embedding lookup counts 0)
  attention    dense MHA 2N(P+R+Vh)S;  dense MQA 2N(2C+R)S;  DSA 2N(2C+R)K
  indexer      scores for top-k: 2IHS (+ IS weights) in the sparse stage
  KL loss      warm-up: target logits 2N(C+R)S + indexer scores 2IHS;  sparse: the same over K keys
A part that trains costs 3x its forward (backward = 2x forward); one that does not, 1x. Packing makes S
smaller than assumed, so the figure is an upper bound of the work needed.
"""

import time

import jax
import jax.numpy as jnp

from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# Dense bf16 tensor-core peaks (vendor data sheets, without sparsity).
_PEAKS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def _param_flops(cfg: ModelConfig, with_mtp: bool) -> tuple[float, float]:
  """(main, indexer) forward projection FLOPs per token."""
  main = indexer = 0.0
  params = functional.abstract_state(cfg).to_pure_dict()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", None) for k in path]
    if keys[0] == "embed" or (keys[0] == "mtp" and not with_mtp) or leaf.ndim < 2:
      continue
    size = float(leaf.size)
    if keys[-1] in _EXPERT_WEIGHTS:
      size *= cfg.moe.experts_per_token / cfg.moe.num_experts
    if "indexer" in keys:
      indexer += 2 * size
    else:
      main += 2 * size
  return main, indexer


def per_token(cfg: ModelConfig, seq_len: int, stage: str, with_mtp: bool) -> float:
  """Training FLOPs per token of `stage` ("dense" | "warmup" | "sparse")."""
  m = cfg.mla
  s = (seq_len + 1) / 2
  layers = cfg.num_layers + int(with_mtp)
  main, indexer = _param_flops(cfg, with_mtp)
  idx = cfg.indexer
  i_h = 0 if idx is None else idx.num_heads * idx.head_dim
  if stage == "dense":
    attention = 2 * m.num_heads * (m.qk_head_dim + m.v_head_dim) * s * layers
    return 3 * (main + attention) + 1 * indexer
  mqa = lambda keys: 2 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * keys * layers
  kl_target = lambda keys: 2 * m.num_heads * (m.latent_dim) * keys * layers
  kl_index = lambda keys: 2 * i_h * keys * layers
  if stage == "warmup":
    return main + mqa(s) + 3 * indexer + kl_target(s) + 3 * kl_index(s)
  k = min(idx.topk, s)
  selection = (2 * i_h + idx.num_heads) * s * layers
  return 3 * (main + mqa(k)) + 3 * indexer + selection + kl_target(k) + 3 * kl_index(k)


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of device 0, where the figure comes from): a data sheet on known GPUs, else measured."""
  device = jax.devices()[0]
  for name, peak in _PEAKS.items():
    if name in device.device_kind:
      return peak, f"{name} bf16 data sheet"
  x = jnp.ones((1024, 1024), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start, reps = time.perf_counter(), 20
  for _ in range(reps):
    y = matmul(x)
  y.block_until_ready()
  return reps * 2 * 1024 ** 3 / (time.perf_counter() - start), f"measured float32 matmul on {device.device_kind}"
