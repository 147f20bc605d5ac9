"""Keep Sampling Mask: the top-k/top-p kept set and log-probabilities restricted to it.

DeepSeek-V3.2 §3.1 "Scaling GRPO" (spec §3): the truncation mask used while sampling is applied to π_θ and
π_old in training, so that sampler and trainer policies share one action subspace and the importance
ratio compares like with like. The sampler records, per generated token, the kept token ids as a fixed
[B, T, K] array padded with -1 (`top_k_top_p_kept_ids`); the trainer computes log-probabilities of the
sampled tokens renormalised over that set (`kept_log_softmax`).

π_ref uses the plain full softmax (`token_log_softmax`): the KL term regularises the policy towards the
reference model itself, which is a fixed distribution over the whole vocabulary and never sampled from;
truncating it by π_θ's own kept set would make the reference move with the policy.

Shapes: B batch, T tokens, V vocab, K kept (K_max); any leading dims work in place of [B, T].
"""

import jax
import jax.numpy as jnp


def token_log_softmax(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token] [B, T] over the full vocabulary (π_ref); fp32."""
  logp_btv = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_btv, tokens[..., None], axis=-1)[..., 0]


def _kept_logits(logits: jax.Array, kept_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Kept logits [B, T, K] with -inf on padding, and whether each position has a kept set [B, T]."""
  valid_btk = kept_ids >= 0
  has_set_bt = valid_btk.any(-1)
  # A position without a kept set reads index 0 everywhere so its (unused) values stay finite: a
  # logsumexp over all -inf would send NaN gradients through the select below.
  use_btk = valid_btk | ~has_set_bt[..., None]
  kept_btk = jnp.take_along_axis(logits.astype(jnp.float32), jnp.where(valid_btk, kept_ids, 0), axis=-1)
  return jnp.where(use_btk, kept_btk, -jnp.inf), has_set_bt


def kept_log_softmax(logits: jax.Array, kept_ids: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(token) [B, T] under softmax(logits) renormalised over the kept set; fp32.

  Args:
    logits: [B, T, V] the logits the sampler drew from, i.e. already divided by the sampling temperature.
    kept_ids: [B, T, K] kept token ids padded with -1; ids must be distinct. A position whose ids are all
      -1 (no truncation recorded, e.g. a prompt token) uses the full softmax.
    tokens: [B, T] the sampled tokens.

  Returns:
    [B, T] log-probabilities; -inf for a token outside its kept set (probability 0 under truncation).
  """
  if kept_ids.shape[:-1] != tokens.shape or logits.shape[:-1] != tokens.shape:
    raise ValueError(
        f"logits.shape={logits.shape}, kept_ids.shape={kept_ids.shape}, tokens.shape={tokens.shape} are "
        "invalid; allowed: logits [B, T, V], kept_ids [B, T, K], tokens [B, T].")
  kept_btk, has_set_bt = _kept_logits(logits, kept_ids)
  lse_bt = jnp.where(has_set_bt, jax.nn.logsumexp(kept_btk, axis=-1),
                     jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
  in_set_bt = (kept_ids == tokens[..., None]).any(-1) | ~has_set_bt
  token_logit_bt = jnp.take_along_axis(logits.astype(jnp.float32), tokens[..., None], axis=-1)[..., 0]
  return jnp.where(in_set_bt, token_logit_bt, -jnp.inf) - lse_bt


def kept_probability_mass(logits: jax.Array, kept_ids: jax.Array) -> jax.Array:
  """Σ_{v in kept set} softmax(logits)_v [B, T]: how much of the untruncated policy the set keeps."""
  kept_btk, has_set_bt = _kept_logits(logits, kept_ids)
  log_mass_bt = jax.nn.logsumexp(kept_btk, axis=-1) - jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.where(has_set_bt, jnp.exp(log_mass_bt), 1.0)


def top_k_top_p_kept_ids(
    logits: jax.Array, *, k_max: int, top_k: int | None = None, top_p: float = 1.0, temperature: float = 1.0
) -> jax.Array:
  """Kept set [B, T, K_max] of top-k then top-p truncation, sorted by probability, padded with -1.

  Semantics (those of HF `TopKLogitsWarper` then `TopPLogitsWarper`, and of vLLM):
    1. p = softmax(logits / temperature);
    2. top-k keeps the `top_k` most probable tokens (ties: lower id first); `top_k=None` means K_max,
       so K_max always caps the set;
    3. top-p renormalises p over those and keeps the smallest prefix, in decreasing probability, whose
       cumulative probability is >= top_p; the most probable token is always kept.
  Sampling from `sample_from_kept` with these ids draws exactly from that truncated distribution.
  """
  vocab = logits.shape[-1]
  if not (isinstance(k_max, int) and 1 <= k_max <= vocab):
    raise ValueError(f"k_max={k_max!r} is invalid; allowed: an integer in [1, V={vocab}].")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= k_max):
    raise ValueError(f"top_k={top_k!r} is invalid; allowed: None or an integer in [1, k_max={k_max}].")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r} is invalid; allowed: 0 < top_p <= 1.")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r} is invalid; allowed: > 0 (greedy is top_k=1).")
  scaled_btv = logits.astype(jnp.float32) / temperature
  values_btk, ids_btk = jax.lax.top_k(scaled_btv, k_max)
  keep_btk = jnp.arange(k_max) < (k_max if top_k is None else top_k)
  keep_btk = jnp.broadcast_to(keep_btk, values_btk.shape)
  if top_p < 1:
    probs_btk = jax.nn.softmax(jnp.where(keep_btk, values_btk, -jnp.inf), axis=-1)
    cum_btk = jnp.cumsum(probs_btk, axis=-1)
    mass_before_btk = jnp.concatenate([jnp.zeros_like(cum_btk[..., :1]), cum_btk[..., :-1]], axis=-1)
    keep_btk = keep_btk & (mass_before_btk < top_p)
  return jnp.where(keep_btk, ids_btk, -1).astype(jnp.int32)


def sample_from_kept(rng: jax.Array, logits: jax.Array, kept_ids: jax.Array) -> jax.Array:
  """Tokens [B, T] drawn from softmax(logits) renormalised over each position's kept set.

  `logits` are temperature-scaled, as for `kept_log_softmax`; every position needs a non-empty set.
  """
  kept_btk, _ = _kept_logits(logits, kept_ids)
  choice_bt = jax.random.categorical(rng, kept_btk, axis=-1)
  return jnp.take_along_axis(kept_ids, choice_bt[..., None], axis=-1)[..., 0]
