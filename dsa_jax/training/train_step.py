"""The train step of each stage of continued pre-training (spec section 2): one pure function under one
`jax.jit` with the state donated.

  dense   dense attention (MHA mode); LM (+ MTP, + balance) loss; the main model trains.
  warmup  dense attention in MHA mode (cuDNN's flash attention on a GPU) with the MQA operands returned for the
          KL target; only the dense indexer KL; only the indexer trains.
  sparse  DSA (top-k sparse attention, MQA mode); LM (+ MTP, + balance) loss for the main model and the
          sparse KL over the selected set for the indexer. The two never mix: the indexer's input is
          detached inside the model and the KL target is a stop-gradient, while top-k selection gives
          the LM loss no gradient into the indexer. So one summed loss trains each part on its own loss.
Freezing is the optimizer's (`optimizer.build`); MoE biases follow `moe_balance` when the main model trains.
The MTP block is one more layer here: its indexer gets its KL (in the warm-up too) and its router bias moves.
The LM (and MTP) loss never materialises [T, V] logits: the model returns the LM head's input and weights and
`losses.chunked_cross_entropy` runs over token chunks. The indexer KL is computed inside each layer
(`losses.attention_reducer`), so the attention tensors it reads never leave the layer. `StepConfig.remat`
rematerialises the layers (`dsa_jax.model.transformer.REMAT_POLICIES`) and `StepConfig.q_chunk` runs the
attention over query chunks (`dsa_jax.model.mla`) to fit long rows.

On a mesh (`dsa_jax.sharding.partition.jit_sharded`) `StepConfig.expert_dispatch` runs the routed experts
expert-parallel and `StepConfig.context` permutes the sequence for context parallelism. The step takes the
batch in document order and builds the labels itself before permuting, so callers never permute.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from dsa_jax.model import LayerAux, functional
from dsa_jax.model.config import ModelConfig
from dsa_jax.model.moe import ExpertDispatch
from dsa_jax.model.transformer import REMAT_POLICIES, check_inputs
from dsa_jax.sharding import context_parallel
from dsa_jax.training import losses, moe_balance
from dsa_jax.training import optimizer as optim
from dsa_jax.training.state import TrainState, model_state

Batch = dict[str, jax.Array]  # ids, loss_mask, segment_ids, positions: [B, T] int32, in document order


def check_batch(batch: Batch, cfg: ModelConfig) -> None:
  """Raises ValueError on a host batch the step would train on wrong without a word: ids (hence labels, the
  ids shifted) outside the vocabulary, rows longer than `max_position` or empty, positions beyond it. The
  loop calls it on each batch before the step (one min and one max per array, on the host)."""
  check_inputs(cfg, batch["ids"], batch.get("positions"), names=("batch['ids']", "batch['positions']", ""))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about a step (hashable: the jit cache key)."""
  model: ModelConfig
  stage: str
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  loss: losses.LossConfig = losses.LossConfig()
  bias_gamma: float = moe_balance.DEFAULT_GAMMA
  implementation: str | None = None
  # `expert_parallel.make_dispatch(mesh)`: hashed by identity, so build it once per mesh (one compile).
  expert_dispatch: ExpertDispatch | None = None
  context: int = 1  # the mesh's context axis: the step permutes the sequence into its load-balanced order
  remat: str = "none"  # "none" | "layer" | "layer_save_dots": see `dsa_jax.model.transformer`
  q_chunk: int = 0  # attention queries per chunk, a divisor of T (`dsa_jax.model.mla`); 0: all at once

  def __post_init__(self):
    if self.stage not in optim.STAGES:
      raise ValueError(f"StepConfig.stage={self.stage!r} is invalid; allowed: {optim.STAGES}.")
    if self.stage != "dense" and self.model.indexer is None:
      raise ValueError(f"StepConfig.stage={self.stage!r} needs a model with an indexer; allowed: 'dense'.")
    if not (isinstance(self.context, int) and self.context > 0):
      raise ValueError(f"StepConfig.context={self.context!r} is invalid; allowed: a positive integer.")
    if not (isinstance(self.q_chunk, int) and self.q_chunk >= 0):
      raise ValueError(f"StepConfig.q_chunk={self.q_chunk!r} is invalid; allowed: 0 or a positive integer.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"StepConfig.remat={self.remat!r} is invalid; allowed: {tuple(REMAT_POLICIES)}.")

  @property
  def with_mtp(self) -> bool:
    """Whether the MTP block runs; in the warm-up only for its indexer's KL (its LM loss is not used)."""
    return self.loss.mtp_weight > 0 and self.model.num_mtp_layers > 0

  @property
  def attention(self) -> tuple[str, str]:
    """(attention kind, MLA mode) of the stage's forward pass."""
    return {"dense": ("dense", "mha"), "warmup": ("dense", "mha"), "sparse": ("sparse", "mqa")}[self.stage]


def with_labels(batch: Batch, config: StepConfig) -> Batch:
  """Adds labels / label_mask (the next token) and, with MTP, mtp_labels / mtp_label_mask (two ahead), then
  permutes every field into the context-parallel order: the labels must be built first, in document order,
  because shifting along the permuted array no longer finds the next token."""
  out = dict(batch)
  out["labels"], out["label_mask"] = losses.shifted_labels(batch["ids"], batch["loss_mask"], batch["segment_ids"])
  if config.with_mtp:
    out["mtp_labels"], out["mtp_label_mask"] = losses.shifted_labels(batch["ids"], batch["loss_mask"],
                                                                     batch["segment_ids"], shift=2)
  return context_parallel.to_context_layout(out, config.context) if config.context > 1 else out


def _with_mtp(layer_aux: tuple[LayerAux, ...], mtp_aux: LayerAux | None) -> tuple[LayerAux, ...]:
  """The layers' aux and the MTP block's: it trains like one more layer (indexer KL, balance loss, load)."""
  return layer_aux + (() if mtp_aux is None else (mtp_aux,))


def loss_fn(params: dict, other: dict, batch: Batch, config: StepConfig):
  """-> (total loss, (metrics, per-layer aux, MTP aux)) of a `with_labels` batch. Terms a stage does not train
  on are reported, not added."""
  kind, mode = config.attention
  out = functional.apply(config.model, model_state(config.model, params, other), batch["ids"], attention=kind,
                         mla_mode=mode, implementation=config.implementation, positions=batch["positions"],
                         segment_ids=batch["segment_ids"], with_mtp=config.with_mtp,
                         expert_dispatch=config.expert_dispatch, next_ids=batch["labels"], remat=config.remat,
                         with_logits=False, q_chunk=config.q_chunk, mqa_operands=config.stage == "warmup",
                         aux_reducer=losses.attention_reducer(config.model, config.loss, config.stage,
                                                              config.implementation))
  aux = _with_mtp(out.layer_aux, out.mtp_aux)
  lm = functools.partial(losses.chunked_cross_entropy, head=out.lm_head,
                         chunk=losses.lm_chunk(config.loss, config.model.vocab_size))
  metrics = {"lm_loss": lm(out.head_input, labels=batch["labels"], label_mask=batch["label_mask"])}
  if config.stage == "warmup":
    kl = losses.reduced_kl(aux, batch["ids"].size)
    metrics["kl"] = kl
    return config.loss.kl_weight * kl, (metrics, out.layer_aux, out.mtp_aux)
  total = metrics["lm_loss"]
  if config.with_mtp:
    metrics["mtp_loss"] = lm(out.mtp_head_input, labels=batch["mtp_labels"], label_mask=batch["mtp_label_mask"])
    total = total + config.loss.mtp_weight * metrics["mtp_loss"]
  if config.model.num_layers > config.model.first_k_dense:
    metrics["balance_loss"] = losses.balance_loss(config.model, aux)
    total = total + config.loss.balance_weight * metrics["balance_loss"]
  if config.stage == "sparse":
    metrics["kl"] = losses.reduced_kl(aux, batch["ids"].size)
    total = total + config.loss.kl_weight * metrics["kl"]
  return total, (metrics, out.layer_aux, out.mtp_aux)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def step(state: TrainState, batch: Batch, *, config: StepConfig) -> tuple[TrainState, dict]:
  """One optimizer step of `config.stage` -> (new state, scalar metrics)."""
  (loss, (metrics, layer_aux, mtp_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.model_state, with_labels(batch, config), config)
  tx = optim.build(config.optimizer, config.stage)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  other = state.model_state
  if config.stage != "warmup" and config.model.num_layers > config.model.first_k_dense:
    other = moe_balance.update(other, layer_aux, config.bias_gamma, mtp_aux)
    metrics["max_load_ratio"] = moe_balance.imbalance(_with_mtp(layer_aux, mtp_aux))
  labels = optim.group_labels(grads)
  for group in optim.GROUPS:
    metrics[f"grad_norm_{group}"] = optax.global_norm(jax.tree.map(
        lambda g, l, group=group: g if l == group else jnp.zeros((), g.dtype), grads, labels))
  metrics["loss"] = loss
  new_state = TrainState(params=params, model_state=other, opt_state=opt_state, step=state.step + 1,
                         rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)))
  return new_state, metrics
