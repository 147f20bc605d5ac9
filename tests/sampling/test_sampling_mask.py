"""Keep Sampling Mask: kept-set semantics of top-k/top-p and the restricted log-softmax (spec §3)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_jax import rl

# Probabilities [0.5, 0.3, 0.15, 0.05] as logits; ids are positions in this vocabulary of 4.
LOGITS = jnp.log(jnp.array([[[0.3, 0.05, 0.5, 0.15]]]))


class KeptLogSoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_values(self):
    # Kept {2, 3} of probabilities [.., .., 0.5, 0.15]: renormalised 0.5/0.65 and 0.15/0.65.
    # Token 0 lies outside the set: log 0. Row 1 has no recorded set: full softmax, log 0.3.
    logits = jnp.concatenate([LOGITS, LOGITS, LOGITS, LOGITS], axis=1)  # [1, 4, 4]
    kept = jnp.array([[[2, 3, -1], [3, -1, 2], [2, 3, -1], [-1, -1, -1]]])
    tokens = jnp.array([[2, 3, 0, 0]])
    logp = self.variant(rl.kept_log_softmax)(logits, kept, tokens)
    chex.assert_shape(logp, (1, 4))
    chex.assert_trees_all_close(logp[0, :2], jnp.log(jnp.array([0.5 / 0.65, 0.15 / 0.65])), atol=1e-6)
    self.assertEqual(float(logp[0, 2]), -math.inf)
    chex.assert_trees_all_close(logp[0, 3], math.log(0.3), atol=1e-6)
    mass = self.variant(rl.kept_probability_mass)(logits, kept)
    chex.assert_trees_all_close(mass, jnp.array([[0.65, 0.65, 0.65, 1.0]]), atol=1e-6)

  def test_full_softmax_and_finite_gradients(self):
    chex.assert_trees_all_close(rl.token_log_softmax(LOGITS, jnp.array([[1]])), jnp.log(jnp.array([[0.05]])),
                                atol=1e-6)
    kept = jnp.array([[[2, 0, -1]]])
    grad = jax.grad(lambda lg: rl.kept_log_softmax(lg, kept, jnp.array([[2]])).sum())(LOGITS)
    # d log(p2/(p0 + p2))/d logit = [−p0, 0, 1 − p2, 0] / (p0 + p2) over kept {0, 2}.
    chex.assert_trees_all_close(grad, jnp.array([[[-0.375, 0.0, 0.375, 0.0]]]), atol=1e-6)
    empty = jnp.full((1, 1, 3), -1)
    grad = jax.grad(lambda lg: rl.kept_log_softmax(lg, empty, jnp.array([[1]])).sum())(LOGITS)
    self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))

  def test_rejects_mismatched_shapes(self):
    with self.assertRaisesRegex(ValueError, r"kept_ids.shape=\(1, 2, 3\).*allowed"):
      rl.kept_log_softmax(LOGITS, jnp.zeros((1, 2, 3), jnp.int32), jnp.zeros((1, 1), jnp.int32))


class TopKTopPTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      # Sorted ids by probability: 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05).
      ("no_truncation", dict(k_max=4), [2, 0, 3, 1]),
      ("k_max_caps", dict(k_max=3), [2, 0, 3]),
      ("top_k", dict(k_max=4, top_k=2), [2, 0, -1, -1]),
      ("top_p_smallest_prefix", dict(k_max=4, top_p=0.55), [2, 0, -1, -1]),  # 0.5 < 0.55 <= 0.8
      ("top_p_three", dict(k_max=4, top_p=0.85), [2, 0, 3, -1]),  # 0.8 < 0.85 <= 0.95
      ("top_p_keeps_one", dict(k_max=4, top_p=1e-6), [2, -1, -1, -1]),
      # After top-2 the renormalised probabilities are 0.625, 0.375: top-p 0.6 keeps one token (over the
      # full distribution it would keep two, 0.5 < 0.6).
      ("top_p_after_top_k", dict(k_max=4, top_k=2, top_p=0.6), [2, -1, -1, -1]),
      # Temperature 3: ∝ p^(1/3), sorted [0.336, 0.283, 0.225, 0.156]; 0.619 < 0.65 needs a third token,
      # where temperature 1 stops at two (0.8 >= 0.65).
      ("temperature", dict(k_max=4, top_p=0.65, temperature=3.0), [2, 0, 3, -1]),
      ("temperature_1", dict(k_max=4, top_p=0.65), [2, 0, -1, -1]),
  )
  def test_kept_set(self, kwargs, expected):
    kept = self.variant(functools.partial(rl.top_k_top_p_kept_ids, **kwargs))(LOGITS)
    chex.assert_shape(kept, (1, 1, kwargs["k_max"]))
    np.testing.assert_array_equal(kept[0, 0], np.array(expected))

  @settings(max_examples=25, deadline=None)
  @given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(1, 8), top_p=st.floats(0.05, 1.0),
         temperature=st.floats(0.3, 3.0))
  def test_smallest_prefix_reaching_top_p(self, seed, top_k, top_p, temperature):
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 3, 12)) * 2.0, jnp.float32)
    kept = np.asarray(rl.top_k_top_p_kept_ids(logits, k_max=8, top_k=top_k, top_p=top_p,
                                               temperature=temperature))
    probs = np.asarray(jax.nn.softmax(logits / temperature, axis=-1), np.float64)
    for (b, t), p in zip(np.ndindex(2, 3), probs.reshape(6, 12)):
      ids = kept[b, t]
      n = int((ids >= 0).sum())
      self.assertTrue(1 <= n <= top_k and np.all(ids[n:] == -1))
      order = np.argsort(-p, kind="stable")
      np.testing.assert_array_equal(ids[:n], order[:n])
      topk_mass = p[order[:top_k]].sum()
      cum = np.cumsum(p[order[:n]]) / topk_mass
      self.assertTrue(top_p >= 1 or cum[-1] >= top_p - 1e-5)  # reaches top_p ...
      self.assertTrue(n == 1 or cum[-2] < top_p + 1e-5)  # ... and no shorter prefix does

  def test_rejects_bad_arguments(self):
    for kwargs, pattern in ((dict(k_max=5), r"k_max=5 .*\[1, V=4\]"),
                            (dict(k_max=2, top_k=3), r"top_k=3 .*k_max=2"),
                            (dict(k_max=2, top_p=0.0), r"top_p=0.0 .*0 < top_p <= 1"),
                            (dict(k_max=2, temperature=0.0), r"temperature=0.0 .*> 0")):
      with self.assertRaisesRegex(ValueError, pattern):
        rl.top_k_top_p_kept_ids(LOGITS, **kwargs)


class SampleFromKeptTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_samples_lie_in_kept_set_with_kept_probabilities(self):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 32)) * 3.0, jnp.float32)
    kept = rl.top_k_top_p_kept_ids(logits, k_max=6, top_k=5, top_p=0.7)
    # 64 draws per position as a leading axis; an "rbg" key compiles far faster than threefry on CPU.
    rng = jax.random.key(2, impl="rbg")
    tokens = self.variant(rl.sample_from_kept)(rng, jnp.broadcast_to(logits, (64, 4, 16, 32)),
                                               jnp.broadcast_to(kept, (64, 4, 16, 6)))  # [64, B, T]
    chex.assert_shape(tokens, (64, 4, 16))
    tokens, kept_np = np.asarray(tokens), np.asarray(kept)
    self.assertTrue((tokens[..., None] == kept_np[None]).any(-1).all())
    # The most probable kept token is drawn with its renormalised probability (64 draws, 5 s.e.).
    p_top = np.exp(np.asarray(rl.kept_log_softmax(logits, kept, kept[..., 0])))  # [B, T]
    freq = (tokens == kept_np[None, ..., 0]).mean(0)
    std_err = np.sqrt(p_top * (1 - p_top) / 64) + 1e-3
    self.assertTrue(np.all(np.abs(freq - p_top) < 5 * std_err))
