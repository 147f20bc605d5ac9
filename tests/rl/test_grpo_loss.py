"""GRPO loss and advantages against hand-derived numbers (spec §3)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from dsa_jax import rl

LN2 = math.log(2.0)


def _loss_fn(**kwargs):
  return functools.partial(rl.grpo_loss, **kwargs)


class GroupAdvantagesTest(parameterized.TestCase):

  def test_mean_centred_without_std(self):
    adv = rl.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.6]]))
    chex.assert_trees_all_close(adv, jnp.array([[0.5, -0.5, -0.5, 0.5], [-0.1, -0.1, -0.1, 0.3]]), atol=1e-6)

  def test_std_normalisation_option(self):
    # Group std of [1, 0, 0, 1] is 0.5; a group of equal rewards has Â = 0, not NaN.
    adv = rl.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]]), normalize_std=True)
    chex.assert_trees_all_close(adv, jnp.array([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), atol=1e-5)

  def test_rejects_flat_rewards(self):
    with self.assertRaisesRegex(ValueError, r"rewards.shape=\(8,\).*\[P, G\]"):
      rl.group_advantages(jnp.zeros(8))


class GrpoLossHandTest(chex.TestCase):

  def _clip_case(self):
    """Ratios [[1.5, 0.5, 1.0], [1.5, 0.5, pad]], Â = [1, −1], ε = 0.2, no KL, no off-policy drift."""
    old = jnp.log(jnp.array([[0.2, 0.4, 0.3], [0.2, 0.4, 0.3]]))
    logp = old + jnp.log(jnp.array([[1.5, 0.5, 1.0], [1.5, 0.5, 7.0]]))
    logp = logp.at[1, 2].set(-jnp.inf)  # padding may hold anything
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    return logp, old, logp, logp, jnp.array([1.0, -1.0]), mask

  @chex.variants(with_jit=True, without_jit=True)
  def test_clipped_policy_term_sequence_mean(self):
    # Seq 0 (Â = 1): min(r, clip r) = [1.2, 0.5, 1.0] -> mean 0.9.
    # Seq 1 (Â = −1): min(−r, −clip r) = [−1.5, −0.8] -> mean −1.15.  J = (0.9 − 1.15)/2 = −0.125.
    loss, aux = self.variant(_loss_fn(eps=0.2, beta=0.1, delta=1.0))(*self._clip_case())
    chex.assert_shape(aux["seq_mask"], (2,))
    chex.assert_trees_all_close(loss, 0.125, atol=1e-6)
    # Clip binds at (0, 0) (Â > 0, r > 1 + ε) and (1, 1) (Â < 0, r < 1 − ε): 2 of 5 tokens.
    chex.assert_trees_all_close(
        {k: aux[k] for k in ("clip_frac", "ratio_min", "ratio_max", "kl", "logp_diff_max", "seq_mask")},
        {"clip_frac": 0.4, "ratio_min": 0.5, "ratio_max": 1.5, "kl": 0.0, "logp_diff_max": 0.0,
         "seq_mask": jnp.ones(2)}, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_clipped_policy_term_token_mean(self):
    # (1.2 + 0.5 + 1.0 − 1.5 − 0.8) / 5 = 0.08.
    loss, _ = self.variant(_loss_fn(eps=0.2, beta=0.1, delta=1.0, token_mean=True))(*self._clip_case())
    chex.assert_trees_all_close(loss, -0.08, atol=1e-6)

  def _on_policy_case(self):
    """π_θ = π_old = μ; π_ref/π_θ = 2 on seq 0 (3 tokens) and 1/2 on seq 1 (2 tokens); Â = [0.5, −0.5]."""
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.1], [0.3, 0.2, 0.9]]))
    ref = logp + jnp.array([[LN2], [-LN2]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    return logp, logp, ref, logp, jnp.array([0.5, -0.5]), mask

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_on_policy_pass(self):
    # r = 1 exactly. KL_t = x − ln x − 1: 1 − ln 2 (x = 2) and ln 2 − 1/2 (x = 1/2).
    # J = [(0.5 − 0.1(1 − ln 2)) + (−0.5 − 0.1(ln 2 − 0.5))] / 2 = −0.025.
    args = self._on_policy_case()
    loss, aux = self.variant(_loss_fn(eps=0.2, beta=0.1, delta=0.0))(*args)
    self.assertEqual(float(aux["ratio_min"]), 1.0)
    self.assertEqual(float(aux["ratio_max"]), 1.0)
    chex.assert_trees_all_close(loss, 0.025, atol=1e-6)
    chex.assert_trees_all_close(aux["kl"], (3 * (1 - LN2) + 2 * (LN2 - 0.5)) / 5, atol=1e-6)
    chex.assert_trees_all_close(aux["clip_frac"], 0.0)
    clip_free, _ = rl.grpo_loss(*args, eps=0.999, beta=0.1, delta=0.0)
    chex.assert_trees_all_close(loss, clip_free, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_on_first_pass(self):
    # ∂(−J)/∂logp_t = [−Â_i·r + β·r·(logp_t − ref_t)] / (|o_i|·B), since ∂/∂logp [r(x − ln x − 1)] =
    # r(logp − ref). Seq 0: (−0.5 − 0.1 ln 2)/6; seq 1: (0.5 + 0.1 ln 2)/4; padding: 0.
    logp, old, ref, smp, adv, mask = self._on_policy_case()
    grad = self.variant(jax.grad(lambda lp: rl.grpo_loss(lp, old, ref, smp, adv, mask, eps=0.2, beta=0.1,
                                                         delta=0.0)[0]))(logp)
    g0, g1 = (-0.5 - 0.1 * LN2) / 6, (0.5 + 0.1 * LN2) / 4
    chex.assert_trees_all_close(grad, jnp.array([[g0, g0, g0], [g1, g1, 0.0]]), atol=1e-6)

  def test_only_logp_carries_gradient(self):
    # old/ref/sampler derived from the same array are stop-gradient: on-policy, Â = 1, ref = logp − 0.3,
    # ∂(−J)/∂logp_t = (−1 + 0.1·0.3)/2 = −0.485.
    fn = lambda lp: rl.grpo_loss(lp, lp, lp - 0.3, lp + 0.2, jnp.array([1.0]), jnp.ones((1, 2)), eps=0.2,
                                 beta=0.1, delta=0.1)[0]
    grad = jax.grad(fn)(jnp.log(jnp.array([[0.5, 0.2]])))
    chex.assert_trees_all_close(grad, jnp.full((1, 2), -0.485), atol=1e-6)


class OffPolicyMaskTest(chex.TestCase):

  def _case(self):
    """On-policy w.r.t. π_old; μ drifts by mean log(μ/π_θ) per sequence; δ = 0.1."""
    logp = jnp.log(jnp.full((5, 2), 0.25))
    drift = jnp.array([[0.2, 0.2], [0.05, 0.05], [0.2, 0.2], [0.2, 0.2], [0.05, 10.0]])
    mask = jnp.array([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]])
    # Â < 0 & drift > δ; Â < 0 & drift < δ; Â > 0; Â = 0; Â < 0 with drift > δ only on padding.
    adv = jnp.array([-1.0, -1.0, 1.0, 0.0, -1.0])
    return logp, logp, logp, logp + drift, adv, mask

  @chex.variants(with_jit=True, without_jit=True)
  def test_fires_only_for_negative_advantage_and_drift(self):
    loss, aux = self.variant(_loss_fn(eps=0.2, beta=0.0, delta=0.1))(*self._case())
    chex.assert_trees_all_close(aux["seq_mask"], jnp.array([0.0, 1.0, 1.0, 1.0, 1.0]))
    # J = mean(Â·M) = (0 − 1 + 1 + 0 − 1)/5.
    chex.assert_trees_all_close(loss, 0.2, atol=1e-6)
    # |μ − π_θ| on generated tokens: (4·0.2 + 2·0.05 + 0.05)/9 (padding's 10 excluded), max 0.2.
    expected = {"masked_frac_neg_adv": 0.2, "masked_frac_pos_adv": 0.0, "logp_diff_mean": 0.15,
                "logp_diff_max": 0.2}
    chex.assert_trees_all_close({k: aux[k] for k in expected}, expected, atol=1e-6)

  def test_threshold_is_strict(self):
    logp = jnp.log(jnp.full((2, 2), 0.25))
    smp = logp + jnp.array([[0.0], [1e-3]])
    mask = rl.off_policy_sequence_mask(logp, smp, jnp.array([-1.0, -1.0]), jnp.ones((2, 2)), 0.0)
    chex.assert_trees_all_close(mask, jnp.array([1.0, 0.0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_sequence_keeps_only_kl_gradient(self):
    # Seq 0 is masked. β = 0: its gradient is 0. β = 0.1, π_ref = π_θ/2 on seq 0: only the KL gradient
    # β·r·(logp − ref)/(|o|·B) = 0.1·ln 2/10 remains.
    logp, old, ref, smp, adv, mask = self._case()
    ref = ref.at[0].add(-LN2)
    for beta, expected in ((0.0, 0.0), (0.1, 0.1 * LN2 / 10)):
      grad = self.variant(jax.grad(lambda lp, b=beta: rl.grpo_loss(lp, old, ref, smp, adv, mask, eps=0.2,
                                                                   beta=b, delta=0.1)[0]))(logp)
      chex.assert_trees_all_close(grad[0], jnp.full((2,), expected), atol=1e-7)
      self.assertTrue(bool(jnp.all(grad[2] != 0)))

  def test_gradients_finite_with_inf_padding_and_empty_rows(self):
    logp = jnp.array([[-1.0, -jnp.inf], [-jnp.inf, -jnp.inf]])
    mask = jnp.array([[1, 0], [0, 0]])
    fn = lambda lp: rl.grpo_loss(lp, lp - 0.1, lp + 0.3, lp + 0.5, jnp.array([-1.0, 1.0]), mask, eps=0.2,
                                 beta=0.1, delta=0.1)[0]
    loss, grad = jax.value_and_grad(fn)(logp)
    self.assertTrue(bool(jnp.isfinite(loss)))
    self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))


class KlGradientMonteCarloTest(parameterized.TestCase):

  @parameterized.named_parameters(("on_policy", 0.0), ("stale_old_policy", 0.7))
  def test_matches_reverse_kl_gradient(self, staleness):
    """E_{o~π_old}[∇_θ KL_t] = ∇_θ KL(π_θ‖π_ref) = π ⊙ (log π − log π_ref − KL) for softmax logits θ."""
    theta = jnp.array([0.5, -1.0, 0.2, 1.0, -0.3])
    ref_logits = jnp.array([0.0, 0.3, -0.5, 0.1, 0.8])
    old_logits = theta + staleness * jnp.array([1.0, -1.0, 0.5, -0.5, 0.0])
    n = 10000
    p_old = np.exp(np.asarray(old_logits, np.float64))
    tokens = jnp.asarray(np.random.default_rng(0).choice(5, size=n, p=p_old / p_old.sum()))

    def per_sample_loss(th, tok):
      lp = jax.nn.log_softmax(th)[tok].reshape(1, 1)
      old = jax.nn.log_softmax(old_logits)[tok].reshape(1, 1)
      ref = jax.nn.log_softmax(ref_logits)[tok].reshape(1, 1)
      return rl.grpo_loss(lp, old, ref, old, jnp.zeros(1), jnp.ones((1, 1)), eps=0.2, beta=1.0,
                          delta=1e9)[0]

    grads = jax.jit(jax.vmap(jax.grad(per_sample_loss), in_axes=(None, 0)))(theta, tokens)  # [N, V]
    chex.assert_shape(grads, (n, 5))
    p, logp_ref = jax.nn.softmax(theta), jax.nn.log_softmax(ref_logits)
    kl = jnp.sum(p * (jnp.log(p) - logp_ref))
    true_grad = p * (jnp.log(p) - logp_ref - kl)
    std_err = grads.std(0) / np.sqrt(n)
    self.assertTrue(bool(jnp.all(jnp.abs(grads.mean(0) - true_grad) < 4 * std_err + 1e-6)),
                    msg=f"MC {grads.mean(0)} vs true {true_grad} (s.e. {std_err})")


class ValidationTest(parameterized.TestCase):

  def test_errors_name_field_and_allowed(self):
    x = jnp.zeros((2, 3))
    with self.assertRaisesRegex(ValueError, r"ref_logp.shape=\(2, 4\).*\[B, T\]"):
      rl.grpo_loss(x, x, jnp.zeros((2, 4)), x, jnp.zeros(2), x, eps=0.2, beta=0.0, delta=0.0)
    with self.assertRaisesRegex(ValueError, r"advantages.shape=\(3,\).*\[B\]"):
      rl.grpo_loss(x, x, x, x, jnp.zeros(3), x, eps=0.2, beta=0.0, delta=0.0)
    with self.assertRaisesRegex(ValueError, r"eps=1.5 is invalid; allowed: 0 < eps < 1"):
      rl.grpo_loss(x, x, x, x, jnp.zeros(2), x, eps=1.5, beta=0.0, delta=0.0)
    with self.assertRaisesRegex(ValueError, r"beta=-0.1 is invalid"):
      rl.grpo_loss(x, x, x, x, jnp.zeros(2), x, eps=0.2, beta=-0.1, delta=0.0)
