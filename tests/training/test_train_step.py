"""The stages' gradient flow (spec section 2) and the step's bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.model import functional
from dsa_jax.training import losses, optimizer, train_step
from dsa_jax.training.state import model_state
from tests.training.conftest import fresh_state


def _split(tree):
  labels = optimizer.group_labels(tree)
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  label_leaves = jax.tree.leaves(labels)
  return ({jax.tree_util.keystr(p): x for (p, x), l in zip(leaves, label_leaves) if l == "main"},
          {jax.tree_util.keystr(p): x for (p, x), l in zip(leaves, label_leaves) if l == "indexer"})


def test_warmup_trains_only_the_indexers_and_its_loss_falls(cfg, batch):
  cfg = cfg.replace(num_mtp_layers=1)  # the MTP block's indexer learns its own KL too
  config = train_step.StepConfig(model=cfg, stage="warmup",
                                 optimizer=optimizer.OptimizerConfig(warmup_steps=0, weight_decay=0.0))
  state = fresh_state(cfg, "warmup", config.optimizer)
  main0, index0 = jax.tree.map(np.asarray, _split(state.params))
  kls = []
  for _ in range(8):
    state, metrics = train_step.step(state, batch, config=config)
    kls.append(float(metrics["kl"]))
  main1, index1 = _split(state.params)
  assert all(np.array_equal(main0[k], main1[k]) for k in main0)
  assert any(k.startswith("['mtp']") for k in index0)
  assert all(not np.array_equal(index0[k], index1[k]) for k in index0)
  assert kls[-1] < 0.5 * kls[0], kls


def _sparse_terms(params, other, cfg, batch):
  out = functional.apply(cfg, model_state(cfg, params, other), batch["ids"], attention="sparse", mla_mode="mqa",
                         positions=batch["positions"], segment_ids=batch["segment_ids"])
  lm = losses.lm_loss(out.logits, batch["ids"], batch["loss_mask"], batch["segment_ids"])
  kl = losses.indexer_kl(cfg, out.layer_aux, batch["positions"], batch["segment_ids"], losses.LossConfig(),
                         sparse=True)
  return lm, kl


def test_sparse_stage_losses_reach_only_their_own_parameters(cfg, batch):
  state = fresh_state(cfg, "sparse")
  grad_lm = jax.grad(lambda p: _sparse_terms(p, state.model_state, cfg, batch)[0])(state.params)
  grad_kl = jax.grad(lambda p: _sparse_terms(p, state.model_state, cfg, batch)[1])(state.params)
  lm_main, lm_index = _split(grad_lm)
  kl_main, kl_index = _split(grad_kl)
  assert all(not np.any(g) for g in lm_index.values())
  assert all(not np.any(g) for g in kl_main.values())
  assert any(np.any(g) for g in lm_main.values()) and any(np.any(g) for g in kl_index.values())


def test_kl_target_is_head_summed_l1_normalised_attention(cfg, batch):
  """losses.indexer_kl (chunked kernel API) == KL from a naive softmax over [T, S], per layer, summed."""
  state = fresh_state(cfg, "warmup")
  out = functional.apply(cfg, model_state(cfg, state.params, state.model_state), batch["ids"], attention="dense",
                         mla_mode="mqa", positions=batch["positions"], segment_ids=batch["segment_ids"])
  pos, seg = batch["positions"], batch["segment_ids"]
  mask = (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] == seg[:, :, None])  # [B, T, S]
  naive = 0.0
  for aux in out.layer_aux:
    logits = jnp.einsum("btnc,bsc->bnts", aux.attention.mqa.q, aux.attention.mqa.kv) * cfg.softmax_scale
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1).sum(axis=1)  # head sum
    p = probs / probs.sum(-1, keepdims=True)
    idx = aux.attention.indexer
    scores = jnp.einsum("btih,bsh->btis", idx.q, idx.k)
    scores = jnp.einsum("btis,bti->bts", jax.nn.relu(scores), idx.w)
    log_q = jax.nn.log_softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    naive += jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - jnp.where(mask, log_q, 0.0)), 0.0).sum(-1).mean()
  ours = losses.indexer_kl(cfg, out.layer_aux, pos, seg, losses.LossConfig(kl_t_chunk=16, kl_s_chunk=16),
                           sparse=False)
  np.testing.assert_allclose(ours, naive, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="implementation='nope'"):  # the choice reaches the kernel's api
    losses.indexer_kl(cfg, out.layer_aux, pos, seg, losses.LossConfig(), sparse=False, implementation="nope")
  mha = functional.apply(cfg, model_state(cfg, state.params, state.model_state), batch["ids"], attention="dense")
  with pytest.raises(ValueError, match="needs the MQA operands"):  # plain MHA mode keeps none to recompute p from
    losses.indexer_kl(cfg, mha.layer_aux, pos, seg, losses.LossConfig(), sparse=False)


def test_dense_stage_freezes_the_indexer_and_updates_router_biases(cfg, batch):
  cfg = cfg.replace(num_mtp_layers=1)  # with the MTP loss
  config = train_step.StepConfig(model=cfg, stage="dense", bias_gamma=0.01,
                                 optimizer=optimizer.OptimizerConfig(warmup_steps=0))
  state = fresh_state(cfg, "dense", config.optimizer)
  index0 = jax.tree.map(np.asarray, _split(state.params)[1])
  state, metrics = train_step.step(state, batch, config=config)
  assert all(np.array_equal(v, _split(state.params)[1][k]) for k, v in index0.items())
  for bias in (state.model_state["layers"][1]["ffn"]["bias"], state.model_state["mtp"]["block"]["ffn"]["bias"]):
    bias = np.asarray(bias)
    assert np.all(np.isclose(np.abs(bias), 0.01) | (bias == 0)) and np.any(bias)
  assert metrics["grad_norm_indexer"] == 0 and metrics["grad_norm_main"] > 0 and int(state.step) == 1
  assert metrics["mtp_loss"] > 0
