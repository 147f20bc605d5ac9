"""The HuggingFace golden fixtures (`tests/fixtures/README.md`) on the GPU: float32 within the CPU parity bound,
and the weights loaded in bf16 (`load_hf(path, jnp.bfloat16)`, the model computing in bf16) within a bound
derived from bf16 rounding, with the implementation a user gets (None: the grouped matmul kernel on bf16; the
fixtures' widths are below the attention and indexer kernels', so those run XLA).

The fixtures' seeds give every top-k and route a relative margin of 1e-4 in float32, far below bf16's rounding
(2^-8 = 3.9e-3): in bf16 the selections and routes flip (on CPU 14, 58 and 121 of the tiny fixture's 640 top-k
entries per layer, logits then off by 0.69 of their largest magnitude), and one flipped key or expert moves a
logit by any amount. The bf16 run is therefore given the golden top-k of every layer and the experts the float32
run chose (HF's: the float32 run's logits and top-k match the golden ones), and the bound covers the rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsa_jax
from dsa_jax.model import functional
from tests.gpu.checks import BF16_ROUNDING, replayed_topk
from tests.model.test_hf_parity import FIXTURE_DIRS, relative_error

F32_PARITY = 1e-4  # tests/model/test_hf_parity.py's bound, relative to the largest golden logit


def bf16_bound(num_layers: int) -> float:
  """Each rounding to bf16 errs by at most u = 2^-8 relative. The logits are the LM head's product of two rounded
  operands (final hidden state, weights) over a residual stream to which each layer adds two sublayer outputs
  (attention, FFN), each ending in a matmul of two rounded operands: to first order the logits err by at most
  (2 + 4 L) u of their scale, on top of the float32 parity. (On CPU: tiny, L = 3, 0.019 <= 0.055; alt, L = 2,
  0.017 <= 0.039.)"""
  return F32_PARITY + (2 + 4 * num_layers) * BF16_ROUNDING


def bf16_logits(path, golden, experts: dict) -> jax.Array:
  """Logits of the fixture loaded and computed in bf16, each layer attending to its golden top-k and each MoE
  layer's tokens sent to `experts`."""
  cfg, params = dsa_jax.load_hf(path, jnp.bfloat16)
  with replayed_topk([jnp.asarray(golden[f"topk_indices_layer{i}"]) for i in range(cfg.num_layers)]):
    return jax.jit(lambda p, ids, e: functional.forward(cfg, p, ids, attention="sparse", forced_experts=e))(
        params, golden["input_ids"], experts)


@pytest.mark.parametrize("name", ["tiny", "alt"])
def test_hf_logits_bf16(name):
  path = FIXTURE_DIRS[name]
  golden = np.load(path / "golden.npz")
  cfg, params = dsa_jax.load_hf(path)
  out = jax.jit(lambda p, ids: functional.apply(cfg, p, ids, attention="sparse"))(params, golden["input_ids"])
  assert relative_error(out.logits, golden["logits"]) < F32_PARITY
  for i in range(cfg.num_layers):
    np.testing.assert_array_equal(out.layer_aux[i].attention.topk_indices, golden[f"topk_indices_layer{i}"],
                                  err_msg=f"float32 top-k of layer {i}")
  experts = {i: out.layer_aux[i].moe.experts for i in range(cfg.num_layers) if cfg.is_moe_layer(i)}
  err = relative_error(bf16_logits(path, golden, experts).astype(jnp.float32), golden["logits"])
  assert err <= bf16_bound(cfg.num_layers), f"{name}: bf16 logits off by {err:.3g} of the largest golden logit > " \
                                            f"bound {bf16_bound(cfg.num_layers):.3g}"
