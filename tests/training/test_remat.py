"""Rematerialisation changes what the backward pass recomputes, never the loss or the gradients."""

import chex
import jax
import pytest

from dsa_jax.training import train_step
from tests.training.conftest import fresh_state


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_remat_policies_give_the_loss_and_gradients_of_none(cfg, batch, stage):
  cfg = cfg.replace(num_mtp_layers=1)  # the MTP block is rematerialised too
  state = fresh_state(cfg, stage)
  results, regions = {}, {}
  for remat in ("none", "layer", "layer_save_dots"):
    config = train_step.StepConfig(model=cfg, stage=stage, remat=remat)
    args = (state.params, state.model_state, train_step.with_labels(batch, config), config)
    regions[remat] = str(jax.make_jaxpr(train_step.loss_fn, static_argnums=(3,))(*args)).count("policy=")
    (loss, (metrics, _, _)), grads = jax.jit(jax.value_and_grad(train_step.loss_fn, has_aux=True),
                                             static_argnums=(3,))(*args)
    results[remat] = (loss, metrics, grads)
  for remat in ("layer", "layer_save_dots"):
    assert regions[remat] == regions["none"] + cfg.num_layers + 1  # one more per layer and for the MTP block
    chex.assert_trees_all_close(results[remat], results["none"], rtol=1e-5, atol=1e-7)


def test_remat_is_validated(cfg):
  with pytest.raises(ValueError, match=r"StepConfig.remat='block' is invalid; allowed: \('none', 'layer'"):
    train_step.StepConfig(model=cfg, stage="dense", remat="block")
