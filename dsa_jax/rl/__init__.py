"""GRPO with DeepSeek-V3.2's stabilisers (DeepSeek-V3.2 §3.1 "Scaling GRPO"; spec §3).

Public API for outside checks:

  loss, aux = dsa_jax.rl.grpo_loss(logp, old_logp, ref_logp, sampler_logp, advantages, mask,
                                   eps=..., beta=..., delta=..., token_mean=False)

  logp, old_logp, ref_logp, sampler_logp: [B, T] fp32 log-probabilities of the sampled tokens under the
    current policy π_θ, the old policy π_old (trainer recomputation), the frozen reference π_ref and the
    sampler μ (as returned at rollout time);
  advantages: [B] Â_i = R_i − mean of its group's rewards (`group_advantages`, flattened from [P, G]);
  mask: [B, T] 1 on generated tokens;
  loss: the negated objective J of spec §3, per-sequence token mean then mean over the B sequences
    (`token_mean=True`: mean over all generated tokens);
  aux["seq_mask"]: [B] the off-policy sequence mask M_i (0 iff Â_i < 0 and the mean of
    log μ − log π_θ over the sequence's tokens exceeds δ); the other aux keys are listed in `grpo_loss`.

Keep Sampling Mask: compute logp and old_logp with `kept_log_softmax` over the sampler's recorded kept
set, ref_logp with `token_log_softmax` (full softmax). Rewards: `get_task`, `register_task`, `Task`.
"""

from dsa_jax import submodules
from dsa_jax.rl.advantages import group_advantages
from dsa_jax.rl.grpo_loss import grpo_loss, k3_kl, off_policy_sequence_mask
from dsa_jax.rl.rewards import DigitTask, Task, digit_reward, get_task, register_task, task_names
from dsa_jax.sampling.sampling_mask import (
    kept_log_softmax,
    kept_probability_mass,
    sample_from_kept,
    token_log_softmax,
    top_k_top_p_kept_ids,
)

__all__ = [
    "DigitTask",
    "Task",
    "digit_reward",
    "get_task",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "kept_log_softmax",
    "kept_probability_mass",
    "off_policy_sequence_mask",
    "register_task",
    "sample_from_kept",
    "task_names",
    "token_log_softmax",
    "top_k_top_p_kept_ids",
]

__getattr__ = submodules(__name__)  # dsa_jax.rl.<module> after a plain `import dsa_jax`
