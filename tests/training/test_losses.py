"""Loss and balance arithmetic against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import AttentionAux, LayerAux, MoEAux
from dsa_jax.sharding import context_parallel
from dsa_jax.training import losses, moe_balance


# Each position's next-token probabilities, all different, so every (position, target) pair that counts changes
# the loss; the logits are their logs plus a per-position offset that log-softmax must remove.
PROBS = np.asarray([[0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.5, 0.25, 0.25], [0.05, 0.15, 0.8], [0.4, 0.45, 0.15],
                    [0.6, 0.3, 0.1]])


@pytest.mark.parametrize("shift, counted", [
    (1, [(0, 1), (1, 0), (4, 0)]),  # 2 -> 3 crosses into document 2; target 4 is masked; 5 has no target
    (2, [(0, 0), (3, 0)]),  # 1 -> 3 and 2 -> 4 cross documents; 4 and 5 have no target
])
def test_lm_loss_counts_exactly_the_unmasked_targets_of_the_same_document(shift, counted):
  logits = jnp.asarray(np.log(PROBS) + np.arange(6)[:, None], jnp.float32)[None]
  ids = jnp.asarray([[2, 1, 0, 2, 1, 0]])
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2]])
  mask = jnp.asarray([[1, 1, 1, 1, 0, 1]])  # masks the token at position 4 as a target
  want = -np.mean([np.log(PROBS[t, v]) for t, v in counted])  # (t, ids[t + shift]) pairs, listed by hand
  np.testing.assert_allclose(losses.lm_loss(logits, ids, mask, segments, shift), want, rtol=1e-6)


@pytest.mark.parametrize("shift", [1, 2])
def test_labels_built_in_document_order_give_the_same_loss_after_the_context_permutation(shift):
  logits = jax.random.normal(jax.random.key(0), (2, 8, 5))
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 5)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8])
  mask = jnp.asarray([[1, 1, 1, 1, 0, 1, 1, 1], [1] * 8])
  labels, label_mask = losses.shifted_labels(ids, mask, segments, shift)
  order = context_parallel.load_balanced_order(8, 2)  # [0 1 6 7 2 3 4 5]
  np.testing.assert_allclose(losses.cross_entropy(logits[:, order], labels[:, order], label_mask[:, order]),
                             losses.lm_loss(logits, ids, mask, segments, shift), rtol=1e-6)


def test_sequence_balance_loss_is_one_when_balanced_and_larger_when_not():
  scores = jnp.broadcast_to(jnp.asarray([0.75, 0.75, 0.25, 0.25]), (1, 4, 4))  # P = (3, 3, 1, 1) / 8
  balanced = jnp.asarray([[[0, 1], [2, 3], [0, 1], [2, 3]]])
  skewed = jnp.asarray([[[0, 1]] * 4])
  np.testing.assert_allclose(losses.sequence_balance_loss(scores, balanced, 4), 1.0, rtol=1e-6)
  np.testing.assert_allclose(losses.sequence_balance_loss(scores, skewed, 4), 1.5, rtol=1e-6)  # f = (2, 2, 0, 0)


def test_bias_update_moves_against_load():
  state = {"layers": {1: {"ffn": {"bias": jnp.zeros(4)}}}}
  attention = AttentionAux(lse=jnp.zeros((1, 2, 1)))
  aux = (LayerAux(attention), LayerAux(attention, MoEAux(jnp.asarray([[[0, 1], [0, 2]]]), jnp.zeros((1, 2, 4)))))
  state["mtp"] = {"block": {"ffn": {"bias": jnp.zeros(4)}}}
  mtp_aux = LayerAux(attention, MoEAux(jnp.asarray([[[3, 2], [3, 1]]]), jnp.zeros((1, 2, 4))))  # loads 0, 1, 1, 2
  new = moe_balance.update(state, aux, gamma=0.1, mtp_aux=mtp_aux)  # loads 2, 1, 1, 0; mean 1
  np.testing.assert_allclose(new["layers"][1]["ffn"]["bias"], [-0.1, 0.0, 0.0, 0.1])
  np.testing.assert_allclose(new["mtp"]["block"]["ffn"]["bias"], [0.1, 0.0, 0.0, -0.1])


@pytest.mark.parametrize("chunk", [4, 5, 64])  # several chunks; a chunk that needs padding; one chunk
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_cross_entropy_equals_the_plain_one_in_value_and_gradients(chunk, dtype):
  kh, kw, kl, km = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(kh, (2, 13, 8)).astype(dtype)
  head = 0.5 * jax.random.normal(kw, (8, 50))  # float32 parameters, used in the compute dtype as the model does
  labels = jax.random.randint(kl, (2, 13), 0, 50)
  mask = jax.random.bernoulli(km, 0.7, (2, 13))
  plain = lambda h, w: losses.cross_entropy(
      jnp.einsum("btd,dv->btv", h, w.astype(dtype), preferred_element_type=jnp.float32), labels, mask)
  chunked = lambda h, w: losses.chunked_cross_entropy(h, w, labels, mask, chunk=chunk)
  (want, want_grads), (got, got_grads) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head) for f in (plain, chunked))
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol)
  assert got_grads[0].dtype == dtype and got_grads[1].dtype == jnp.float32
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol * 1e-2)


def test_lm_chunk_follows_the_byte_budget():
  assert losses.lm_chunk(losses.LossConfig(), 129280) == 4096  # 2 GiB of float32 logits at V3.2's vocabulary
  assert losses.lm_chunk(losses.LossConfig(lm_chunk_bytes=2**20), 512) == 512
