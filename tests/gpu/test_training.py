"""20 optimizer steps of each training stage on the GPU (`train_step.step`, the loop's step) with
implementation="pallas" against "xla": the loss curves agree and fall.

The tiny kernel-width config of `test_model`, one batch repeated (so the loss must fall), AdamW without warm-up.
Tolerance: max over the 20 steps of |loss_pallas - loss_xla| <= 2 x the max over the steps of |loss_xla(bf16) -
loss_xla(float32)|: after the first step Adam divides each gradient by its own running scale, so the rounding
differences of bf16 grow along a curve, and those of the kernels (other summation orders, a few more rounded
operands) may grow like them but not beyond twice as much.
"""

import jax
import numpy as np
import pytest

from dsa_jax.training import optimizer, train_step
from tests.gpu.test_model import kernel_tiny, make_batch
from tests.training.conftest import fresh_state

STEPS = 20


def loss_curve(dtype: str, stage: str, implementation: str) -> np.ndarray:
  """The loss of each of STEPS steps from the same initial state and batch."""
  step_config = train_step.StepConfig(model=kernel_tiny(dtype), stage=stage, implementation=implementation,
                                      optimizer=optimizer.OptimizerConfig(warmup_steps=0))
  state, batch, losses = fresh_state(step_config.model, stage, step_config.optimizer), make_batch(), []
  for _ in range(STEPS):
    state, metrics = train_step.step(state, batch, config=step_config)
    losses.append(metrics["loss"])
  return np.asarray(jax.device_get(losses), np.float64)


def assert_curves_agree(pallas: np.ndarray, xla: np.ndarray, xla_f32: np.ndarray, what: str) -> None:
  for name, curve in (("pallas", pallas), ("xla", xla), ("xla float32", xla_f32)):
    assert curve[-1] < curve[0], f"{what}: the {name} loss did not fall over {STEPS} steps: {curve.tolist()}"
  err, bound = np.abs(pallas - xla), 2 * np.max(np.abs(xla - xla_f32)) + 1e-6
  assert np.all(err <= bound), (f"{what}: step {int(np.argmax(err))} max |pallas - xla| = {err.max():.3g} > "
                                f"bound {bound:.3g}; pallas {pallas.tolist()}, xla {xla.tolist()}")


@pytest.mark.parametrize("stage", ["dense", "warmup", "sparse"])
def test_loss_curves(stage):
  assert_curves_agree(loss_curve("bfloat16", stage, "pallas"), loss_curve("bfloat16", stage, "xla"),
                      loss_curve("float32", stage, "xla"), f"{stage} stage")
