"""Long context on the portable XLA path: the `tiny` model compiled (never run) on the CPU at T = 32K keeps XLA's
temporaries O(T x block), never O(T x S).

At T = S = 32K a single float32 [T, S] array is 4 GiB and a boolean [T, S] mask 1 GiB; scoring the indexer's 16
heads over all keys at once asked for 128 GiB (130 GiB for the gradient). The row-blocked paths need one block of
indexer logits with their ReLU (at most `lightning_indexer.chunked.BLOCK_BYTES`, 256 MiB) plus O(T) arrays: about
0.29 GiB for the forward and 1.46 GiB for the gradient (whose residuals grow linearly in T). The bounds, 1 GiB and
2 GiB, fail on any [T, S] temporary and leave room for XLA's choices.
"""

import jax
import jax.numpy as jnp
import pytest

import dsa_jax
from dsa_jax.model import functional
from dsa_jax.training import losses

T = 32768
GIB = 2**30


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _forward_temp_bytes(attention: str, indexer_fp8: bool = False) -> int:
  cfg = dsa_jax.preset("tiny").replace(max_position=T)
  fn = lambda state, ids: functional.forward(cfg, state, ids, attention=attention, implementation="xla",
                                             indexer_fp8=indexer_fp8)
  return _temp_bytes(fn, functional.abstract_state(cfg), jax.ShapeDtypeStruct((1, T), jnp.int32))


@pytest.mark.parametrize("indexer_fp8", [False, True], ids=["indexer", "fp8_indexer"])
def test_sparse_forward_temporaries(indexer_fp8):
  temp = _forward_temp_bytes("sparse", indexer_fp8)
  assert temp < 1 * GIB, f"sparse forward at T={T} asks XLA for {temp / GIB:.3f} GiB of temporaries (bound 1 GiB)"


def test_dense_forward_temporaries():
  temp = _forward_temp_bytes("dense")
  assert temp < 1 * GIB, f"dense forward at T={T} asks XLA for {temp / GIB:.3f} GiB of temporaries (bound 1 GiB)"


def test_sparse_training_gradient_temporaries():
  """The sparse stage's gradient: LM loss and the sparse indexer KL (chunked in `pallas_kernels.indexer_kl`)."""
  cfg = dsa_jax.preset("tiny").replace(max_position=T)

  def loss(state, ids):
    out = functional.apply(cfg, state, ids, attention="sparse", implementation="xla")
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), ids.shape)
    segment_ids = jnp.zeros_like(ids)
    kl = losses.indexer_kl(cfg, out.layer_aux, positions, segment_ids, losses.LossConfig(), sparse=True)
    return losses.lm_loss(out.logits, ids, jnp.ones_like(ids), segment_ids) + kl

  temp = _temp_bytes(jax.grad(loss), functional.abstract_state(cfg), jax.ShapeDtypeStruct((1, T), jnp.int32))
  assert temp < 2 * GIB, f"sparse training gradient at T={T} asks XLA for {temp / GIB:.3f} GiB (bound 2 GiB)"
