"""The GRPO loss with DeepSeek-V3.2's stabilisers (DeepSeek-V3.2 §3.1 "Scaling GRPO"; spec §3).

  J = 1/B Σ_i 1/|o_i| Σ_t ( min(r·Â_i, clip(r, 1−ε, 1+ε)·Â_i) · M_i − β·KL_t ),   r = π_θ(o_t)/π_old(o_t)
  KL_t = (π_θ/π_old) · (π_ref/π_θ − log(π_ref/π_θ) − 1)                         (unbiased k3, ratio kept)
  M_i = 0 if Â_i < 0 and 1/|o_i| Σ_t log(π_sampler(o_t)/π_θ(o_t)) > δ, else 1  (off-policy sequence mask)

Every input is a log-probability of the sampled token, so the functions are independent of how those were
computed (Keep Sampling Mask: `sampling_mask.kept_log_softmax`; Keep Routing: the model's forward). The
mean over the B sequences of the batch equals the paper's 1/G group mean averaged over prompts when every
prompt has G samples. Everything is computed in fp32.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _check_number(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
  # Traced values (a swept hyper-parameter under jit) cannot be checked; Python numbers are.
  if isinstance(value, (int, float)) and not ok(value):
    raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}.")


def _validate(logp, old_logp, ref_logp, sampler_logp, advantages, mask, eps, beta) -> None:
  named = {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "sampler_logp": sampler_logp,
           "mask": mask}
  for name, x in named.items():
    if x.ndim != 2 or x.shape != logp.shape:
      raise ValueError(
          f"{name}.shape={x.shape} is invalid; allowed: [B, T] equal to logp.shape={logp.shape}.")
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"advantages.shape={advantages.shape} is invalid; allowed: [B]={logp.shape[:1]}.")
  _check_number("eps", eps, lambda v: 0 < v < 1, "0 < eps < 1")
  _check_number("beta", beta, lambda v: v >= 0, ">= 0")


def k3_kl(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """KL_t [B, T] = (π_θ/π_old)·(π_ref/π_θ − log(π_ref/π_θ) − 1), spec §3.

  The ratio re-weights samples of π_old, so E_{o~π_old}[KL_t] = KL(π_θ‖π_ref), and it is not detached, so
  E_{o~π_old}[∇KL_t] = ∇KL(π_θ‖π_ref) as well; with the ratio detached the gradient is biased, even on the
  first on-policy pass.
  """
  log_x_bt = ref_logp - logp
  return jnp.exp(logp - old_logp) * (jnp.exp(log_x_bt) - log_x_bt - 1.0)


def off_policy_sequence_mask(
    logp: jax.Array, sampler_logp: jax.Array, advantages: jax.Array, mask: jax.Array, delta: float
) -> jax.Array:
  """M [B] in {0, 1}: 0 iff Â_i < 0 and the mean over generated tokens of log(π_sampler/π_θ) > δ.

  Spec §3 names the numerator π_old and defines it as the probabilities returned by the sampler, so we use
  `sampler_logp` (μ, recorded at rollout time), not the trainer's recomputation `old_logp`: M must see
  both staleness and the sampler/trainer numerical mismatch, and the recomputation hides the latter.
  M is a stop-gradient quantity.
  """
  m_bt = mask.astype(jnp.float32)
  log_ratio_bt = (sampler_logp - jax.lax.stop_gradient(logp)) * m_bt
  mean_log_ratio_b = log_ratio_bt.sum(-1) / jnp.maximum(m_bt.sum(-1), 1.0)
  drop_b = (advantages < 0) & (mean_log_ratio_b > delta)
  return jnp.where(drop_b, 0.0, 1.0)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    sampler_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps: float,
    beta: float,
    delta: float,
    token_mean: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negated GRPO objective of spec §3 and its diagnostics.

  Args:
    logp: [B, T] log π_θ(o_t) under the current parameters, the only input that carries gradient (the
      other log-prob arrays are wrapped in stop_gradient).
    old_logp: [B, T] log π_old(o_t), the trainer's recomputation with the parameters that sampled; the
      ratio r = exp(logp − old_logp) is exactly 1 on the first pass over a rollout batch.
    ref_logp: [B, T] log π_ref(o_t) of the frozen reference parameters.
    sampler_logp: [B, T] log μ(o_t) returned by the sampler; used by the off-policy mask and the
      "logp_diff" diagnostics only.
    advantages: [B] Â_i, one per sequence (`advantages.group_advantages`, flattened).
    mask: [B, T] 1 on generated tokens, 0 on prompt and padding; masked entries of the log-prob arrays
      may hold anything, -inf included.
    eps: clip range ε of the ratio, 0 < ε < 1.
    beta: weight β >= 0 of the KL penalty.
    delta: threshold δ of the off-policy sequence mask.
    token_mean: average over all generated tokens of the batch instead of the paper's per-sequence token
      mean followed by the mean over the B sequences.

  Returns:
    loss: scalar, −J.
    aux: stop-gradient diagnostics: "seq_mask" [B] (M_i), "ratio_min"/"ratio_max" (r over generated
      tokens), "kl" (mean k3 KL_t over generated tokens), "logp_diff_mean"/"logp_diff_max"
      (|log μ − log π_θ| over generated tokens), "masked_frac_neg_adv"/"masked_frac_pos_adv" (fraction
      of the B sequences with M_i = 0 and Â_i < 0 / > 0; the latter is 0 by construction and reported as
      a check), "clip_frac" (fraction of generated tokens whose clipped term is the minimum, i.e. whose
      policy gradient is cut by the clip).
  """
  _validate(logp, old_logp, ref_logp, sampler_logp, advantages, mask, eps, beta)
  valid_bt = mask > 0
  m_bt = valid_bt.astype(jnp.float32)
  # Zero the unused entries first so a -inf there cannot produce NaN values or gradients.
  logp, old_logp, ref_logp, sampler_logp = (
      jnp.where(valid_bt, x.astype(jnp.float32), 0.0) for x in (logp, old_logp, ref_logp, sampler_logp))
  old_logp, ref_logp, sampler_logp = jax.lax.stop_gradient((old_logp, ref_logp, sampler_logp))
  adv_b = advantages.astype(jnp.float32)

  ratio_bt = jnp.exp(logp - old_logp)
  unclipped_bt = ratio_bt * adv_b[:, None]
  clipped_bt = jnp.clip(ratio_bt, 1.0 - eps, 1.0 + eps) * adv_b[:, None]
  policy_bt = jnp.minimum(unclipped_bt, clipped_bt)
  seq_mask_b = off_policy_sequence_mask(logp, sampler_logp, adv_b, m_bt, delta)
  kl_bt = k3_kl(logp, old_logp, ref_logp)
  objective_bt = (policy_bt * seq_mask_b[:, None] - beta * kl_bt) * m_bt

  n_tokens = jnp.maximum(m_bt.sum(), 1.0)
  if token_mean:
    objective = objective_bt.sum() / n_tokens
  else:
    objective = (objective_bt.sum(-1) / jnp.maximum(m_bt.sum(-1), 1.0)).mean()

  logp_diff_bt = jnp.abs(sampler_logp - logp)
  dropped_b = 1.0 - seq_mask_b
  aux = {
      "seq_mask": seq_mask_b,
      "ratio_min": jnp.where(valid_bt, ratio_bt, jnp.inf).min(),
      "ratio_max": jnp.where(valid_bt, ratio_bt, -jnp.inf).max(),
      "kl": (kl_bt * m_bt).sum() / n_tokens,
      "logp_diff_mean": (logp_diff_bt * m_bt).sum() / n_tokens,
      "logp_diff_max": (logp_diff_bt * m_bt).max(),
      "masked_frac_neg_adv": (dropped_b * (adv_b < 0)).mean(),
      "masked_frac_pos_adv": (dropped_b * (adv_b > 0)).mean(),
      "clip_frac": ((clipped_bt < unclipped_bt) * m_bt).sum() / n_tokens,
  }
  return -objective, jax.lax.stop_gradient(aux)
