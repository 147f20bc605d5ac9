"""Functional identities of the model: MHA = MQA, DSA = dense while T <= top-k, documents stay apart,
Keep Routing replays choices verbatim."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsa_jax
from dsa_jax.model import AttentionOptions, config, functional


def tiny(**changes):
  return config.tiny().replace(**changes)


class EquivalenceTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.cfg = tiny()
    self.params = functional.init(self.cfg, seed=0)
    self.ids = jnp.asarray(np.random.default_rng(0).integers(0, self.cfg.vocab_size, (2, 20)))

  def test_mha_equals_mqa(self):
    """Same function; with mqa_operands MHA mode also hands over MQA mode's operands (the warm-up's KL target)."""
    mha = functional.apply(self.cfg, self.params, self.ids, attention="dense", mla_mode="mha", mqa_operands=True)
    mqa = functional.apply(self.cfg, self.params, self.ids, attention="dense", mla_mode="mqa")
    chex.assert_trees_all_close(mha.logits, mqa.logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(mha.hidden_states, mqa.hidden_states, atol=1e-5, rtol=1e-5)
    for a, b in zip(mha.layer_aux, mqa.layer_aux):
      chex.assert_trees_all_close(a.attention.lse, b.attention.lse, atol=1e-5, rtol=1e-5)
      chex.assert_trees_all_close(a.attention.mqa, b.attention.mqa, atol=1e-5, rtol=1e-5)
    plain = functional.apply(self.cfg, self.params, self.ids, attention="dense", mla_mode="mha")
    assert all(layer.attention.mqa is None for layer in plain.layer_aux)

  def test_dsa_equals_dense_when_t_le_topk(self):
    cfg = tiny(indexer=config.IndexerConfig(num_heads=16, head_dim=16, topk=20))
    params = functional.init(cfg, seed=1)
    sparse = functional.forward(cfg, params, self.ids, attention="sparse")
    dense = functional.forward(cfg, params, self.ids, attention="dense")
    chex.assert_trees_all_close(sparse, dense, atol=1e-5, rtol=1e-5)

  def test_dsa_differs_from_dense_beyond_topk(self):
    sparse = functional.forward(self.cfg, self.params, self.ids, attention="sparse")
    dense = functional.forward(self.cfg, self.params, self.ids, attention="dense")
    topk = self.cfg.indexer.topk
    chex.assert_trees_all_close(sparse[:, :topk], dense[:, :topk], atol=1e-5, rtol=1e-5)
    self.assertGreater(float(jnp.abs(sparse[:, topk:] - dense[:, topk:]).max()), 1e-4)

  def test_topk_is_causal_and_sized(self):
    out = functional.apply(self.cfg, self.params, self.ids)
    idx = np.asarray(out.layer_aux[0].attention.topk_indices)
    chex.assert_shape(idx, (2, 20, self.cfg.indexer.topk))
    t = np.arange(20)[None, :, None]
    self.assertTrue(np.all(idx < np.minimum(t + 1, 20)))
    self.assertTrue(np.all((idx >= 0).sum(-1) == np.minimum(np.arange(20) + 1, self.cfg.indexer.topk)))

  def test_packed_documents_equal_separate_runs(self):
    for attention in ("dense", "sparse"):
      ids = self.ids[:1]
      split = 12
      segment_ids = jnp.asarray([[0] * split + [1] * (20 - split)])
      positions = jnp.asarray([list(range(split)) + list(range(20 - split))])
      packed = functional.forward(self.cfg, self.params, ids, attention=attention, positions=positions,
                                  segment_ids=segment_ids)
      first = functional.forward(self.cfg, self.params, ids[:, :split], attention=attention)
      second = functional.forward(self.cfg, self.params, ids[:, split:], attention=attention)
      chex.assert_trees_all_close(packed, jnp.concatenate([first, second], axis=1), atol=1e-5, rtol=1e-5)

  def test_keep_routing_replays_choices(self):
    out = functional.apply(self.cfg, self.params, self.ids)
    recorded = {i: aux.moe.experts for i, aux in enumerate(out.layer_aux) if aux.moe is not None}
    self.assertTrue(recorded)
    replayed = functional.apply(self.cfg, self.params, self.ids, forced_experts=recorded)
    chex.assert_trees_all_close(replayed.logits, out.logits, atol=0, rtol=0)
    layer = min(recorded)
    other = {layer: (recorded[layer] + 1) % self.cfg.moe.num_experts}
    forced = functional.apply(self.cfg, self.params, self.ids, forced_experts=other)
    np.testing.assert_array_equal(forced.layer_aux[layer].moe.experts, other[layer])
    self.assertGreater(float(jnp.abs(forced.logits - out.logits).max()), 1e-4)

    def loss(router):
      params = jax.tree.map(lambda x: x, self.params)
      params["layers"][layer]["ffn"]["router"].set_value(router)
      return functional.forward(self.cfg, params, self.ids, forced_experts=other).sum()

    grad = jax.grad(loss)(self.params["layers"][layer]["ffn"]["router"].get_value())
    self.assertGreater(float(jnp.abs(grad).max()), 0.0)

  def test_sparse_attention_needs_indexer(self):
    cfg = tiny(indexer=None)
    params = functional.init(cfg)
    functional.forward(cfg, params, self.ids, attention="dense")
    with self.assertRaisesRegex(ValueError, "attention='sparse' needs an indexer"):
      functional.forward(cfg, params, self.ids, attention="sparse")

  def test_mtp_logits_equal_the_mtp_layer_applied_by_hand(self):
    """Spec: the MTP layer joins RMSNorm(embedding of token i + 1) and RMSNorm(last hidden state) (enorm, hnorm;
    the official and vLLM order), projects them with eh_proj, runs its block, and predicts token i + 2 through
    head_norm and the shared head. Norm weights are random so that swapping them shows."""
    cfg, params = self.cfg, jax.tree.map(lambda x: x, self.params)
    keys = iter(jax.random.split(jax.random.key(4), 3))
    for name in ("enorm", "hnorm", "head_norm"):
      weight = params["mtp"][name]["weight"]
      weight.set_value(1 + 0.5 * jax.random.normal(next(keys), weight.get_value().shape))
    out = functional.apply(cfg, params, self.ids, with_mtp=True)
    value = lambda *path: np.asarray(functools.reduce(lambda s, k: s[k], path, params).get_value(), np.float64)
    norm = lambda x, w: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps) * w
    ids = np.asarray(self.ids)
    next_ids = np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)  # token i + 1; the last position repeats
    joined = np.concatenate([norm(value("embed")[next_ids], value("mtp", "enorm", "weight")),
                             norm(np.asarray(out.hidden_states[-1], np.float64), value("mtp", "hnorm", "weight"))], -1)
    model = nnx.merge(functional.graphdef(cfg), params)
    block_out, _ = model.mtp.block(jnp.asarray(joined @ value("mtp", "eh_proj"), jnp.float32),
                                   model.layout(jnp.broadcast_to(jnp.arange(20), (2, 20)), jnp.zeros((2, 20), int)),
                                   AttentionOptions())
    want = norm(np.asarray(block_out, np.float64), value("mtp", "head_norm", "weight")) @ value("lm_head")
    np.testing.assert_allclose(out.mtp_logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  def test_bad_attention_kind(self):
    with self.assertRaisesRegex(ValueError, r"attention='full' is invalid; allowed: \('dense', 'sparse'\)"):
      dsa_jax.forward(self.cfg, self.params, self.ids, attention="full")


def test_bfloat16_compute_tracks_float32():
  cfg32 = config.tiny()
  params = functional.init(cfg32, seed=7)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg32.vocab_size, (1, 16)))  # fixed: no routing flips
  cfg16 = cfg32.replace(dtype="bfloat16")
  out = jax.jit(lambda p: functional.apply(cfg16, p, ids, attention="dense"))(params)
  assert out.logits.dtype == jnp.float32
  assert out.hidden_states[0].dtype == jnp.bfloat16
  ref = jax.jit(lambda p: functional.forward(cfg32, p, ids, attention="dense"))(params)
  assert float(jnp.abs(out.logits - ref).max() / jnp.abs(ref).max()) < 3e-2
