"""Held-out measurements of a DSA model: LM loss with dense or sparse attention, the indexer's dense KL,
the share of dense attention mass that falls inside the indexer's top-k set (how much of the attention
DSA keeps), and retrieval accuracy on the synthetic long-range examples (`dsa_jax.data.retrieval`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.data import retrieval
from dsa_jax.model import AttentionAux, functional
from dsa_jax.model.config import ModelConfig
from dsa_jax.model.indexer import select
from dsa_jax.progress import Progress
from dsa_jax.training import losses
from dsa_jax.training.state import TrainState, model_state


def _apply(cfg: ModelConfig, params: dict, other: dict, batch: dict, attention: str, mla_mode: str | None,
           implementation: str | None):
  return functional.apply(cfg, model_state(cfg, params, other), batch["ids"],
                          attention=attention, mla_mode=mla_mode, implementation=implementation,
                          positions=batch["positions"], segment_ids=batch["segment_ids"])


def logits(cfg: ModelConfig, state: TrainState, batch: dict, attention: str,
           implementation: str | None = None) -> jax.Array:
  """Logits [B, L, V] of a batch (ids, positions, segment_ids).

  The one compiled forward of an evaluation per attention mode: the LM loss and the retrieval examples
  (rows of the same [batch, seq_len] shape) both use it, and it takes the model without the optimizer
  state, whose structure differs between stages, so a run compiles it once per mode, not once per stage.
  """
  return _logits(cfg, state.params, state.model_state, batch, attention, implementation)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "implementation"))
def _logits(cfg: ModelConfig, params: dict, other: dict, batch: dict, attention: str,
            implementation: str | None) -> jax.Array:
  return _apply(cfg, params, other, batch, attention, None, implementation).logits


def lm_loss(cfg: ModelConfig, state: TrainState, batch: dict, attention: str,
            implementation: str | None = None) -> jax.Array:
  out = logits(cfg, state, {k: batch[k] for k in ("ids", "positions", "segment_ids")}, attention, implementation)
  return losses.lm_loss(out, batch["ids"], batch["loss_mask"], batch["segment_ids"])


def unpacked(ids: np.ndarray) -> dict:
  """A batch of whole documents, one per row: positions 0.. and one segment."""
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  return {"ids": jnp.asarray(ids, jnp.int32), "positions": jnp.asarray(positions),
          "segment_ids": jnp.zeros(ids.shape, jnp.int32)}


def selected_mass(cfg: ModelConfig, mqa, lse: jax.Array, idx: jax.Array) -> jax.Array:
  """sum_{s in idx[b, t]} p[b, t, s] -> [B, T]: the share of the head-averaged dense attention p that falls on the
  selected keys. mqa: the layer's MQA operands (q [B, T, N, C+R], kv [B, S, C+R]); lse [B, T, N] the dense
  log-sum-exp of the same queries; idx [B, T, K] selected key indices, -1 padded."""
  kv = jax.vmap(lambda kv_b, i_b: kv_b[jnp.maximum(i_b, 0)])(mqa.kv, idx)  # [B, T, K, C+R]
  logits = jnp.einsum("btnc,btkc->btnk", mqa.q, kv, preferred_element_type=jnp.float32)
  probs = jnp.exp(logits * cfg.softmax_scale - lse[..., None]).mean(axis=2)  # [B, T, K]
  return jnp.where(idx >= 0, probs, 0.0).sum(-1)


def _topk_mass(cfg: ModelConfig, aux: AttentionAux, layout: dict, implementation: str | None) -> jax.Array:
  """Mean over queries of sum_{s in top-k(t)} p[t, s], p the head-averaged dense attention of one layer."""
  idx = select(aux.indexer, cfg.indexer.topk, implementation=implementation, **layout)  # [B, T, K]
  return selected_mass(cfg, aux.mqa, aux.lse, idx).mean()


def indexer_metrics(cfg: ModelConfig, state: TrainState, batch: dict,
                    implementation: str | None = None) -> dict[str, jax.Array]:
  """Dense KL (summed over layers) and top-k attention mass (mean over layers) on one batch; compiled once
  per run, like `logits`."""
  return _indexer_metrics(cfg, state.params, state.model_state, batch, implementation)


@functools.partial(jax.jit, static_argnames=("cfg", "implementation"))
def _indexer_metrics(cfg: ModelConfig, params: dict, other: dict, batch: dict,
                     implementation: str | None) -> dict[str, jax.Array]:
  out = _apply(cfg, params, other, batch, "dense", "mqa", implementation)
  layout = dict(q_positions=batch["positions"], kv_positions=batch["positions"],
                q_segment_ids=batch["segment_ids"], kv_segment_ids=batch["segment_ids"])
  kl = losses.indexer_kl(cfg, out.layer_aux, batch["positions"], batch["segment_ids"], losses.LossConfig(),
                         sparse=False, implementation=implementation)
  mass = jnp.stack([_topk_mass(cfg, aux.attention, layout, implementation) for aux in out.layer_aux]).mean()
  return {"dense_kl": kl, "topk_mass": mass}


def evaluate(cfg: ModelConfig, state: TrainState, batches: list[dict], examples: list[retrieval.Example],
             attention: str, batch_size: int, implementation: str | None = None) -> dict[str, float]:
  """LM loss and retrieval accuracy with `attention`; indexer KL and top-k mass when the model has an indexer.

  Prints a progress line over its forward passes (`dsa_jax.progress`): the first, the middle and the last off a
  terminal.
  """
  passes = len(batches) * (1 if cfg.indexer is None else 2) + -(-len(examples) // batch_size)
  progress = Progress(passes, f"eval {attention}", every=max(1, passes // 2))
  done = 0

  def tick(value):
    nonlocal done
    done += 1
    progress.update(done)
    return value

  result = {"lm_loss": float(np.mean([tick(lm_loss(cfg, state, b, attention, implementation)) for b in batches]))}
  if cfg.indexer is not None:
    metrics = [tick(indexer_metrics(cfg, state, b, implementation)) for b in batches]
    result.update({k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]})
  result.update(retrieval.accuracy(lambda ids: tick(logits(cfg, state, unpacked(ids), attention, implementation)),
                                   examples, batch_size))
  progress.close()
  return result
