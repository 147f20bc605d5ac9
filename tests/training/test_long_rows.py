"""What fits long rows (rematerialisation, query chunks with the KL inside the layer) changes what is kept and
recomputed, never the loss, the metrics or the gradients."""

import re

import chex
import jax
import numpy as np
import pytest

from dsa_jax.training import train_step
from tests.training.conftest import SEQ, fresh_state

CHUNK = SEQ // 2  # two query chunks: a loop in the sparse stage, two unrolled bodies in the dense ones
VARIANTS = [("layer", 0), ("layer_save_dots", 0), ("none", CHUNK), ("layer", CHUNK)]  # (remat, q_chunk)


@pytest.mark.parametrize("stage", ["dense", "warmup", "sparse"])
def test_remat_and_query_chunks_give_the_loss_and_gradients_of_neither(cfg, batch, stage):
  cfg = cfg.replace(num_mtp_layers=1)  # the MTP block is rematerialised and chunked too
  state = fresh_state(cfg, stage)
  results, regions = {}, {}
  for remat, q_chunk in [("none", 0), *VARIANTS]:
    config = train_step.StepConfig(model=cfg, stage=stage, remat=remat, q_chunk=q_chunk)
    args = (state.params, state.model_state, train_step.with_labels(batch, config), config)
    regions[remat, q_chunk] = str(jax.make_jaxpr(train_step.loss_fn, static_argnums=(3,))(*args)).count("policy=")
    (loss, (metrics, _, _)), grads = jax.jit(jax.value_and_grad(train_step.loss_fn, has_aux=True),
                                             static_argnums=(3,))(*args)
    results[remat, q_chunk] = (loss, metrics, grads)
  layers = cfg.num_layers + 1  # and the MTP block
  assert regions["layer", 0] == regions["layer_save_dots", 0] == regions["none", 0] + layers
  # One rematerialised chunk body per layer, holding the layer's own regions (the warm-up's KL): a loop in the
  # sparse stage, unrolled in the dense ones (chunk i attends to the keys up to its last query, so every chunk
  # has its own key count).
  chunk_bodies = 1 if stage == "sparse" else SEQ // CHUNK
  assert regions["none", CHUNK] == (regions["none", 0] + layers) * chunk_bodies
  for variant in VARIANTS:
    chex.assert_trees_all_close(results[variant], results["none", 0], rtol=2e-5, atol=1e-7)


def test_dense_query_chunks_refuse_keys_out_of_document_order(cfg, batch):
  """Dense chunks attend to the keys up to their last query, which is exact only for keys in document order.
  Row 1 in a context-parallel order (positions 0-15, 48-63, 16-47: keys after a query are visible to it) gives
  a NaN loss, not a wrong one."""
  state = fresh_state(cfg, "dense")
  split = dict(batch, positions=batch["positions"].copy())
  split["positions"][1] = np.r_[0:16, 48:64, 16:48]
  losses = {}
  for q_chunk in (0, SEQ // 4):
    config = train_step.StepConfig(model=cfg, stage="dense", q_chunk=q_chunk)
    losses[q_chunk] = float(jax.jit(train_step.loss_fn, static_argnums=(3,))(
        state.params, state.model_state, train_step.with_labels(split, config), config)[0])
  assert np.isfinite(losses[0]) and np.isnan(losses[SEQ // 4])


def test_a_rematerialised_layer_keeps_its_chunk_loop_output(cfg):
  """Under "layer" the query-chunk loop runs forward once and backward once (its chunks rematerialise
  themselves): rebuilding its output in the layer's recomputation would add one loop per layer."""
  state = fresh_state(cfg, "dense")
  ids = np.zeros((1, SEQ), np.int32)
  batch = dict(ids=ids, positions=np.arange(SEQ, dtype=np.int32)[None], segment_ids=ids, loss_mask=ids + 1)
  loops = {}
  for remat in ("none", "layer"):
    config = train_step.StepConfig(model=cfg, stage="dense", remat=remat, q_chunk=SEQ // 4)
    grad = jax.jit(jax.grad(lambda p, c=config: train_step.loss_fn(p, state.model_state,
                                                                  train_step.with_labels(batch, c), c)[0]))
    loops[remat] = len(re.findall(r" while\(", grad.lower(state.params).compile().as_text()))
  assert loops["none"] >= 2 * cfg.num_layers  # a forward and a backward chunk loop per layer (and flash's own)
  assert loops["layer"] == loops["none"]


def test_remat_and_q_chunk_are_validated(cfg):
  with pytest.raises(ValueError, match=r"StepConfig.remat='block' is invalid; allowed: \('none', 'layer'"):
    train_step.StepConfig(model=cfg, stage="dense", remat="block")
  with pytest.raises(ValueError, match=r"StepConfig.q_chunk=-1 is invalid"):
    train_step.StepConfig(model=cfg, stage="dense", q_chunk=-1)
