"""Model FLOPs of one training step of each stage, for MFU: what the stage's mathematics needs, counted once.

For one unpacked row of T tokens (multiply-add = 2 FLOPs), per token, with L the decoder layers (+ 1 when
the MTP block runs), N heads, P / R / Vh the nope / rope / value head dims, C the latent rank, I index heads
of H dims, K the top-k:
  S = (1/T) sum_t (t + 1) = (T + 1) / 2           mean causal keys of a query (exact, not an approximation)
  Ks = (1/T) sum_t min(K, t + 1)                  mean selected (valid) keys of a query
  W = 2 x matmul parameters used per token        routed experts k/E of theirs; the LM head once more when
                                                  the MTP loss is used; embedding lookups and norms 0
  Wi = the same for the indexer's projections (wq_b, wk, weights_proj)
  A = 2N(P + R + Vh) per key in MHA mode (dense stage, warm-up); 2N(2C + R) in MQA mode (sparse: the
      absorbed query against the shared [c | k_rope] entry, then the latent value)
  X = 2I(H + 1) per key: the indexer's scores (I dot products of H, then the weighted sum over heads)
  G = N per key: the KL target, the attention probabilities summed over heads

  dense   3 (W + L A S)                                 the indexer is not run (its inputs are dead code)
  warmup  W + L A S + 3 Wi + L (G S + 3 X S)            main model forward only; the indexer and its dense
                                                        KL over every causal key train
  sparse  3 (W + L A Ks) + 3 Wi + L (X S + G Ks + 2 X Ks)
                                                        selection scores over every causal key (forward),
                                                        the sparse KL's indexer scores over the selected
                                                        keys backward only: their forward is the selection's

A part that trains costs 3x its forward (backward = 2x forward); one that does not, 1x. Recomputation
(rematerialisation, the kernels' recomputed logits, the KL recomputing scores it was given) is not counted:
it is the implementation's cost, not the model's. Softmax, norms and other elementwise work are not
counted. Packing makes the causal key counts smaller than a single row's, so for packed rows the figure
is an upper bound of the work needed. The same formula heads `benchmarks/train_step.md`.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp

from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# Dense bf16 tensor-core peaks (vendor data sheets, without sparsity).
_PEAKS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def mean_causal_keys(seq_len: int) -> float:
  """(1/T) sum_t (t + 1): the keys a query of one unpacked row of T tokens sees, on average."""
  return (seq_len + 1) / 2


def mean_selected_keys(seq_len: int, topk: int) -> float:
  """(1/T) sum_t min(K, t + 1): the valid top-k entries a query of one row has, on average."""
  k = min(topk, seq_len)
  return (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len


def param_flops(cfg: ModelConfig, with_mtp: bool) -> tuple[float, float]:
  """(W, Wi): forward matmul FLOPs per token of the main model and of the indexer projections."""
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


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs per token of one stage, by part (forward and backward included); `total` is what MFU uses."""
  matmuls: float  # the main model's parameters (3W or W)
  attention: float  # L A S or L A Ks, times 3 when the main model trains
  indexer: float  # the indexer's projections and scores
  kl: float  # the KL target's head sum

  @property
  def total(self) -> float:
    return self.matmuls + self.attention + self.indexer + self.kl


def breakdown(cfg: ModelConfig, seq_len: int, stage: str, with_mtp: bool) -> StepFlops:
  """The module docstring's formula, by part, for `stage` ("dense" | "warmup" | "sparse")."""
  m, idx = cfg.mla, cfg.indexer
  layers = cfg.num_layers + int(with_mtp)
  s = mean_causal_keys(seq_len)
  w, wi = param_flops(cfg, with_mtp)
  if with_mtp and stage != "warmup":  # the MTP block's logits reuse the LM head
    w += 2 * cfg.hidden_size * cfg.vocab_size
  if stage == "dense":
    return StepFlops(3 * w, 3 * layers * 2 * m.num_heads * (m.qk_head_dim + m.v_head_dim) * s, 0.0, 0.0)
  if stage not in ("warmup", "sparse"):
    raise ValueError(f"stage={stage!r} is invalid; allowed: ('dense', 'warmup', 'sparse').")
  a = 2 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
  x = 2 * idx.num_heads * (idx.head_dim + 1)
  g = m.num_heads
  if stage == "warmup":  # attends in MHA mode (`train_step.StepConfig.attention`)
    a_mha = 2 * m.num_heads * (m.qk_head_dim + m.v_head_dim)
    return StepFlops(w, layers * a_mha * s, 3 * wi + layers * 3 * x * s, layers * g * s)
  ks = mean_selected_keys(seq_len, idx.topk)
  return StepFlops(3 * w, 3 * layers * a * ks, 3 * wi + layers * (x * s + 2 * x * ks), layers * g * ks)


def per_token(cfg: ModelConfig, seq_len: int, stage: str, with_mtp: bool) -> float:
  """Training FLOPs per token of `stage` ("dense" | "warmup" | "sparse"): `breakdown(...).total`."""
  return breakdown(cfg, seq_len, stage, with_mtp).total


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
