"""The model with the kernels plugged in, on the GPU: logits of `forward` and the loss and parameter gradients of
each training stage's `loss_fn` with implementation="pallas" (sparse MLA, indexer and top-k, indexer KL, grouped
matmul kernels; cuDNN for dense attention) against "xla", for the tiny config at entry widths the kernels take.

Tolerance, per output and per gradient leaf: the kernels may differ from XLA's bf16 computation by at most twice
as much as that differs from the same model in float32 (both paths round the same activations to bf16; the
kernels only sum in other orders and round a few more operands)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from dsa_jax.model import config, functional
from dsa_jax.training import train_step
from tests.gpu.checks import assert_within, f32
from tests.training.conftest import fresh_state, packed_batch


def kernel_tiny(dtype: str = "bfloat16") -> config.ModelConfig:
  """`config.tiny` with a 128 + 64 latent entry and 64-dim index heads (the kernels' widths), computing in `dtype`."""
  base = config.tiny()
  return base.replace(dtype=dtype, mla=dataclasses.replace(base.mla, kv_lora_rank=128, qk_rope_head_dim=64),
                      indexer=dataclasses.replace(base.indexer, head_dim=64, topk=32))


def make_batch():
  """2 rows of 128 tokens, row 0 holding two documents (positions restarting at 80)."""
  return packed_batch(seq=128, split=80)


def assert_like_xla(pallas, xla, xla_f32, what):
  """Leafwise: max |pallas - xla| <= 2 max |xla - xla_f32| (+ 1e-6 for leaves XLA gets exactly)."""
  for (path, p), (_, x), (_, x32) in zip(*(jax.tree_util.tree_leaves_with_path(t) for t in (pallas, xla, xla_f32))):
    p, x, x32 = f32((p, x, x32))
    assert_within(p, x, 2 * float(jnp.max(jnp.abs(x - x32))) + 1e-6, f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_logits(attention):
  state = functional.init(kernel_tiny(), seed=0)
  ids = make_batch()["ids"]
  run = lambda dtype, impl: jax.jit(lambda s: functional.forward(kernel_tiny(dtype), s, ids, attention=attention,
                                                                 implementation=impl))(state)
  assert_like_xla(run("bfloat16", "pallas"), run("bfloat16", "xla"), run("float32", "xla"), "logits")


@pytest.mark.parametrize("stage", ["dense", "warmup", "sparse"])
def test_stage_loss_and_gradients(stage):
  """`train_step.loss_fn` of the stage: LM loss (dense, sparse), indexer KL (warm-up: dense KL; sparse: sparse KL)
  and the MoE balance loss, with their gradients."""
  state = fresh_state(kernel_tiny(), stage)

  def run(dtype, impl):
    step_config = train_step.StepConfig(model=kernel_tiny(dtype), stage=stage, implementation=impl)
    batch = train_step.with_labels({k: jnp.asarray(v) for k, v in make_batch().items()}, step_config)
    fn = lambda p: train_step.loss_fn(p, state.model_state, batch, step_config)[0]
    return jax.jit(jax.value_and_grad(fn))(state.params)

  (loss, grads), (loss_x, grads_x), (loss_32, grads_32) = run("bfloat16", "pallas"), run("bfloat16", "xla"), run(
      "float32", "xla")
  assert_like_xla(loss, loss_x, loss_32, f"{stage} loss")
  assert_like_xla(grads, grads_x, grads_32, f"{stage} gradient")
