"""Group-relative advantages of GRPO (DeepSeek-V3.2 §3.1 "Scaling GRPO"; spec §3).

The paper uses Â_i = R_i − mean(R) over the G outputs of one prompt, without dividing by the group's
standard deviation (the original GRPO division is kept as an option). Rewards come as [P, G]: one row per
prompt, its G samples along the last axis, so a group can never be split by a wrong reshape. Flatten the
result to [B = P·G] in the same row-major order as the rollouts.
"""

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, *, normalize_std: bool = False, std_eps: float = 1e-6) -> jax.Array:
  """Returns Â [P, G] (fp32) from rewards [P, G].

  Args:
    rewards: [P, G] scalar rewards, P prompts with G samples each.
    normalize_std: also divide by the group's (population) std + `std_eps`, as in the original GRPO;
      off by default, as in DeepSeek-V3.2.
    std_eps: keeps groups with identical rewards finite when `normalize_std` is on (their Â is 0).
  """
  if rewards.ndim != 2:
    raise ValueError(
        f"rewards.shape={rewards.shape} is invalid; allowed: [P, G] (prompts, samples per prompt).")
  if std_eps <= 0:
    raise ValueError(f"std_eps={std_eps!r} is invalid; allowed: > 0.")
  r_pg = rewards.astype(jnp.float32)
  adv_pg = r_pg - r_pg.mean(axis=-1, keepdims=True)
  if normalize_std:
    adv_pg = adv_pg / (r_pg.std(axis=-1, keepdims=True) + std_eps)
  return adv_pg
