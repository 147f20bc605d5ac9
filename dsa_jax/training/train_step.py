"""The train step of each stage of continued pre-training (spec section 2): one pure function under one
`jax.jit` with the state donated.

  dense   dense attention (MHA mode); LM (+ MTP, + balance) loss; the main model trains.
  warmup  dense attention in MQA mode; only the dense indexer KL; only the indexer trains.
  sparse  DSA (top-k sparse attention, MQA mode); LM (+ MTP, + balance) loss for the main model and the
          sparse KL over the selected set for the indexer. The two never mix: the indexer's input is
          detached inside the model and the KL target is a stop-gradient, while top-k selection gives
          the LM loss no gradient into the indexer. So one summed loss trains each part on its own loss.
Freezing is the optimizer's (`optimizer.build`); MoE biases follow `moe_balance` when the main model trains.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig
from dsa_jax.training import losses, moe_balance
from dsa_jax.training import optimizer as optim
from dsa_jax.training.state import TrainState, model_state

Batch = dict[str, jax.Array]  # ids, loss_mask, segment_ids, positions: [B, T] int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about a step (hashable: the jit cache key)."""
  model: ModelConfig
  stage: str
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  loss: losses.LossConfig = losses.LossConfig()
  bias_gamma: float = moe_balance.DEFAULT_GAMMA
  implementation: str | None = None

  def __post_init__(self):
    if self.stage not in optim.STAGES:
      raise ValueError(f"StepConfig.stage={self.stage!r} is invalid; allowed: {optim.STAGES}.")
    if self.stage != "dense" and self.model.indexer is None:
      raise ValueError(f"StepConfig.stage={self.stage!r} needs a model with an indexer; allowed: 'dense'.")

  @property
  def with_mtp(self) -> bool:
    return self.stage != "warmup" and self.loss.mtp_weight > 0 and self.model.num_mtp_layers > 0

  @property
  def attention(self) -> tuple[str, str]:
    """(attention kind, MLA mode) of the stage's forward pass."""
    return {"dense": ("dense", "mha"), "warmup": ("dense", "mqa"), "sparse": ("sparse", "mqa")}[self.stage]


def loss_fn(params: dict, other: dict, batch: Batch, config: StepConfig):
  """-> (total loss, (metrics, per-layer aux)). Terms a stage does not train on are reported, not added."""
  kind, mode = config.attention
  out = functional.apply(config.model, model_state(config.model, params, other), batch["ids"], attention=kind,
                         mla_mode=mode, implementation=config.implementation, positions=batch["positions"],
                         segment_ids=batch["segment_ids"], with_mtp=config.with_mtp)
  lm = losses.lm_loss(out.logits, batch["ids"], batch["loss_mask"], batch["segment_ids"])
  metrics = {"lm_loss": lm}
  if config.stage == "warmup":
    kl = losses.indexer_kl(config.model, out.layer_aux, batch["positions"], batch["segment_ids"], config.loss,
                           sparse=False)
    metrics["kl"] = kl
    return config.loss.kl_weight * kl, (metrics, out.layer_aux)
  total = lm
  if config.with_mtp:
    metrics["mtp_loss"] = losses.lm_loss(out.mtp_logits, batch["ids"], batch["loss_mask"], batch["segment_ids"],
                                         shift=2)
    total = total + config.loss.mtp_weight * metrics["mtp_loss"]
  if config.model.num_layers > config.model.first_k_dense:
    metrics["balance_loss"] = losses.balance_loss(config.model, out.layer_aux)
    total = total + config.loss.balance_weight * metrics["balance_loss"]
  if config.stage == "sparse":
    metrics["kl"] = losses.indexer_kl(config.model, out.layer_aux, batch["positions"], batch["segment_ids"],
                                      config.loss, sparse=True)
    total = total + config.loss.kl_weight * metrics["kl"]
  return total, (metrics, out.layer_aux)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def step(state: TrainState, batch: Batch, *, config: StepConfig) -> tuple[TrainState, dict]:
  """One optimizer step of `config.stage` -> (new state, scalar metrics)."""
  (loss, (metrics, layer_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.model_state, batch, config)
  tx = optim.build(config.optimizer, config.stage)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  other = state.model_state
  if config.stage != "warmup" and config.model.num_layers > config.model.first_k_dense:
    other = moe_balance.update(other, layer_aux, config.bias_gamma)
    metrics["max_load_ratio"] = moe_balance.imbalance(layer_aux)
  labels = optim.group_labels(grads)
  for group in optim.GROUPS:
    metrics[f"grad_norm_{group}"] = optax.global_norm(jax.tree.map(
        lambda g, l, group=group: g if l == group else jnp.zeros((), g.dtype), grads, labels))
  metrics["loss"] = loss
  new_state = TrainState(params=params, model_state=other, opt_state=opt_state, step=state.step + 1,
                         rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)))
  return new_state, metrics
