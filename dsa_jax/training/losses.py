"""Losses of continued pre-training (spec section 2; DeepSeek-V3 sections 2.1.2, 2.2 and 4.2).

Defaults and their sources:
  mtp_weight 0.1       DeepSeek-V3 section 4.2: lambda = 0.3 for the first 10T tokens, 0.1 for the rest.
  balance_weight 1e-4  DeepSeek-V3 section 4.2: alpha = 0.0001 ("an extremely small value").
  kl_weight 1.0        the indexer's KL is its only loss and touches no other parameter, so its weight is
                       just its learning-rate scale; the paper publishes none.
  kl_chunk_bytes 256 MiB  the KL's query chunk is sized so that one chunk's gathered keys and logits take
                       about this much (`kl_chunks`): a fixed chunk of 64 queries made the `small` model's
                       8K sparse stage loop 128 times per layer; kl_t_chunk > 0 fixes the chunk instead.
  lm_chunk_bytes 2 GiB the LM loss runs over token chunks whose float32 logits take about this much
                       (`chunked_cross_entropy`): [T, V] logits of 128K tokens and V3.2's 129,280 vocabulary
                       would take 62 GiB; 4096 tokens a chunk at that vocabulary.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from dsa_jax.model import AttentionAux, LayerAux, TokenLayout
from dsa_jax.model.config import ModelConfig
from dsa_jax.validation import check_positive
from pallas_kernels.indexer_kl import api as kl_api


@dataclasses.dataclass(frozen=True)
class LossConfig:
  mtp_weight: float = 0.1
  balance_weight: float = 1e-4
  kl_weight: float = 1.0
  kl_t_chunk: int = 0  # 0: sized from kl_chunk_bytes
  kl_s_chunk: int = 1024
  kl_chunk_bytes: int = 2**28
  lm_chunk_bytes: int = 2**31

  def __post_init__(self):
    for name in ("mtp_weight", "balance_weight", "kl_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)!r} is invalid; allowed: >= 0.")
    check_positive(self, "kl_s_chunk", "kl_chunk_bytes", "lm_chunk_bytes")
    if not (isinstance(self.kl_t_chunk, int) and self.kl_t_chunk >= 0):
      raise ValueError(f"LossConfig.kl_t_chunk={self.kl_t_chunk!r} is invalid; allowed: 0 (automatic) or a "
                       "positive integer.")


def _pow2_floor(x: float) -> int:
  return 1 << max(int(x), 1).bit_length() - 1


def kl_chunks(loss_cfg: LossConfig, aux: AttentionAux, sparse: bool) -> dict:
  """Chunk sizes of the indexer KL for one layer: queries per chunk (and keys per chunk when dense).

  Bytes per query of a sparse chunk: its K gathered latent and indexer keys (bf16) and its attention and
  indexer logits (f32); of a dense chunk, per (query, key) pair: the two sets of logits.
  """
  (_, t, n, c), (_, _, i, h) = aux.mqa.q.shape, aux.indexer.q.shape
  s_chunk = min(loss_cfg.kl_s_chunk, aux.mqa.kv.shape[1])
  if sparse:
    per_query = aux.topk_indices.shape[-1] * (2 * c + 2 * h + 4 * n + 4 * i + 16)
  else:
    per_query = s_chunk * (4 * n + 4 * i + 24)
  t_chunk = loss_cfg.kl_t_chunk or _pow2_floor(loss_cfg.kl_chunk_bytes / per_query)
  return {"t_chunk": min(t_chunk, t)} if sparse else {"t_chunk": min(t_chunk, t), "s_chunk": s_chunk}


def shifted_labels(ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array,
                   shift: int = 1) -> tuple[jax.Array, jax.Array]:
  """Target of each position, ids[:, t + shift], and whether it counts -> (labels, label_mask) [B, T].

  A target counts when its loss_mask is set and it lies in the document of the predicting position, so
  packed rows never learn to predict one document from the end of another. shift=2 is the MTP target.
  Build them in document order: afterwards the sequence may be permuted (context parallelism) and the
  labels travel with their positions. The last `shift` labels repeat the last id (as the model's default
  MTP input does) and never count.
  """
  labels = jnp.pad(ids[:, shift:], ((0, 0), (0, shift)), mode="edge")
  valid = (loss_mask[:, shift:] > 0) & (segment_ids[:, shift:] == segment_ids[:, :-shift])
  return labels, jnp.pad(valid, ((0, 0), (0, shift)))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits [B, T, V] against labels [B, T] where label_mask is set (any token order)."""
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(label_mask, nll, 0.0)) / jnp.maximum(label_mask.sum(), 1)


def lm_chunk(loss_cfg: LossConfig, vocab_size: int) -> int:
  """Tokens per chunk of `chunked_cross_entropy`: float32 logits of about `lm_chunk_bytes`, a power of two."""
  return _pow2_floor(loss_cfg.lm_chunk_bytes / (4 * vocab_size))


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
  """h [c, D] @ w [D, V] accumulated in float32 -> [c, V]."""
  return jnp.einsum("md,dv->mv", h, w, preferred_element_type=jnp.float32)


def _chunks(chunk: int, *xs):
  """[M, ...] arrays -> [M / chunk, chunk, ...] (M a multiple of chunk)."""
  return tuple(x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:]) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll(h, w, labels, weights, chunk):
  return _weighted_nll_fwd(h, w, labels, weights, chunk)[0]


def _weighted_nll_fwd(h, w, labels, weights, chunk):
  def body(total, xs):
    h_c, labels_c, weights_c = xs
    logits = _chunk_logits(h_c, w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, labels_c[:, None], axis=-1)[:, 0]
    return total + jnp.sum(weights_c * nll), lse
  total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunks(chunk, h, labels, weights))
  return total, (h, w, labels, weights, lse.reshape(-1))


def _weighted_nll_bwd(chunk, res, g):
  """Recomputes each chunk's logits: dlogits = g w_t (softmax - onehot), in the compute dtype for the two
  matmuls; dW is accumulated in float32 over the chunks."""
  h, w, labels, weights, lse = res
  def body(dw, xs):
    h_c, labels_c, weights_c, lse_c = xs
    probs = jnp.exp(_chunk_logits(h_c, w) - lse_c[:, None])
    dlogits = (probs - jax.nn.one_hot(labels_c, w.shape[1], dtype=jnp.float32)) * (g * weights_c)[:, None]
    dlogits = dlogits.astype(h.dtype)
    dh = jnp.einsum("mv,dv->md", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
    return dw + jnp.einsum("md,mv->dv", h_c, dlogits, preferred_element_type=jnp.float32), dh
  dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), _chunks(chunk, h, labels, weights, lse))
  return dh.reshape(h.shape), dw.astype(w.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array, label_mask: jax.Array, *,
                          chunk: int) -> jax.Array:
  """`cross_entropy` of logits = hidden [B, T, D] @ head [D, V] without materialising [B, T, V] logits.

  The tokens run `chunk` at a time (padded to a multiple; padding does not count): the forward keeps each
  token's log-sum-exp (4 bytes), the backward recomputes each chunk's logits once (a custom VJP, so the
  head's gradient is summed in float32 whatever its dtype). Inputs in the compute dtype; logits accumulate
  in float32 as `DeepseekV32.logits` does.
  """
  d = hidden.shape[-1]
  h, labels = hidden.reshape(-1, d), labels.reshape(-1)
  weights = label_mask.reshape(-1).astype(jnp.float32) / jnp.maximum(label_mask.sum(), 1)
  chunk = min(chunk, h.shape[0])
  pad = -h.shape[0] % chunk
  if pad:
    h, labels, weights = (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (h, labels, weights))
  return _weighted_nll(h, head.astype(hidden.dtype), labels, weights, chunk)


def lm_loss(logits: jax.Array, ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array,
            shift: int = 1) -> jax.Array:
  """`cross_entropy` against `shifted_labels`: for a sequence in document order (not context-permuted)."""
  return cross_entropy(logits, *shifted_labels(ids, loss_mask, segment_ids, shift))


def layer_kl(cfg: ModelConfig, aux: AttentionAux, loss_cfg: LossConfig, sparse: bool, *, q_positions: jax.Array,
             kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
             implementation: str | None = None) -> jax.Array:
  """KL(p || softmax(I)) of each query of one layer (paper section 2.1; dense or sparse form) -> [B, T].

  Needs the MQA operands (`AttentionAux.mqa`: MQA mode, or MHA mode with `mqa_operands`) of a model with an
  indexer; the sparse form needs sparse attention (`AttentionAux.topk_indices`). Gradients reach only the
  indexer's q, k and w. Positions and segment ids decide visibility, so any token order (context parallelism)
  and any subset of the queries (a query chunk) give the same per-query KL. `implementation` picks the kernel
  of `pallas_kernels.indexer_kl.api` (None: Pallas on a GPU where it fits).
  """
  idx = aux.indexer
  if aux.mqa is None or idx is None or (sparse and aux.topk_indices is None):
    raise ValueError(f"indexer_kl(sparse={sparse}) needs the MQA operands of a forward pass with an indexer"
                     f"{' and sparse attention' if sparse else ''}; allowed: apply(..., mla_mode='mqa') or "
                     "apply(..., mla_mode='mha', mqa_operands=True).")
  args = (aux.mqa.q, aux.mqa.kv, aux.lse, cfg.softmax_scale, idx.q, idx.k, idx.w)
  where = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, implementation=implementation)
  if sparse:
    return kl_api.sparse_kl(*args, aux.topk_indices, **kl_chunks(loss_cfg, aux, True), **where)
  return kl_api.dense_kl(*args, **kl_chunks(loss_cfg, aux, False), **where)


def indexer_kl(cfg: ModelConfig, layer_aux: Sequence[LayerAux], positions: jax.Array, segment_ids: jax.Array,
               loss_cfg: LossConfig, sparse: bool, implementation: str | None = None) -> jax.Array:
  """Sum over layers of the mean per-query KL (`layer_kl`) of a forward pass's whole aux.

  layer_aux: the decoder layers' aux and, when it ran, the MTP block's (its indexer trains the same way).
  """
  where = dict(q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
               implementation=implementation)
  return sum((layer_kl(cfg, layer.attention, loss_cfg, sparse, **where).mean() for layer in layer_aux),
             jnp.zeros((), jnp.float32))


def attention_reducer(cfg: ModelConfig, loss_cfg: LossConfig, stage: str, implementation: str | None = None
                      ) -> Callable[[AttentionAux, TokenLayout], dict]:
  """The `aux_reducer` of a training stage (`dsa_jax.model.mla`): a layer's (or a query chunk's) attention aux
  -> what the stage's loss needs of it, so that the [T, N, C] tensors the KL reads stay inside the layer.

  dense: nothing; warmup / sparse: {"kl_sum": the dense / sparse KL summed over the queries} (`reduced_kl`).
  """
  if stage == "dense":
    return lambda aux, layout: {}

  def reduce(aux: AttentionAux, layout: TokenLayout) -> dict:
    return {"kl_sum": layer_kl(cfg, aux, loss_cfg, stage == "sparse", q_positions=layout.q_positions,
                               kv_positions=layout.kv_positions, q_segment_ids=layout.q_segment_ids,
                               kv_segment_ids=layout.kv_segment_ids, implementation=implementation).sum()}
  return reduce


def reduced_kl(layer_aux: Sequence[LayerAux], num_queries: int) -> jax.Array:
  """`indexer_kl` from aux reduced by `attention_reducer`: sum over layers of kl_sum / (B T)."""
  return sum((layer.attention["kl_sum"] for layer in layer_aux), jnp.zeros((), jnp.float32)) / num_queries


def sequence_balance_loss(scores: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """Sequence-wise balance loss of one MoE layer without its weight (DeepSeek-V3 eqs. 17-20), mean over rows.

  scores [B, T, E] sigmoid affinities, experts [B, T, k]: f_i = E / (k T) * #{t: i chosen},
  P_i = mean_t s_i,t / sum_j s_j,t, L = sum_i f_i P_i (1 when perfectly balanced). A packed row is the
  "sequence".
  """
  _, t, k = experts.shape
  counts = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
  f = counts * num_experts / (k * t)
  p = (scores / scores.sum(axis=-1, keepdims=True)).mean(axis=1)  # [B, E]
  return (f * p).sum(axis=-1).mean()


def balance_loss(cfg: ModelConfig, layer_aux: Sequence[LayerAux]) -> jax.Array:
  """Sum over MoE layers (the MTP block's included when its aux is passed) of `sequence_balance_loss`."""
  losses = [sequence_balance_loss(a.moe.scores, a.moe.experts, cfg.moe.num_experts) for a in layer_aux
            if a.moe is not None]
  return sum(losses, jnp.zeros((), jnp.float32))
