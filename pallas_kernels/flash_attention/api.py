"""Public entry point of dense attention without [T, S]: the dense warm-up and the dense baseline.

"xla": `chunked` (tiles with an online softmax under a custom_vjp; any positions and segment ids, MHA or MQA
mode, any backend). "cudnn": cuDNN flash attention (`cudnn`) for the shapes it takes (bf16 / fp16, head dims
<= 256: MLA's MHA mode, not MQA mode's 576 / 512), run whenever the layout allows it (`cudnn.layout_ok`: the
queries are the keys, in document order, at most `max_segments` documents a row) and the chunked path
otherwise; the choice is made at run time (`lax.cond`), so every caller gets the reference semantics. Its
backward is cuDNN's, or the chunked one where the layout failed or the lse cotangent is nonzero (cuDNN's
backward has no lse input). None: "cudnn" on a GPU for the shapes it takes, "xla" elsewhere.

Today's figures: `benchmarks/flash_attention.md`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.flash_attention import chunked, cudnn

AVAILABLE = ("xla", "cudnn")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
                    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, scale: float,
                    implementation: str | None = None, max_segments: int = cudnn.DEFAULT_MAX_SEGMENTS,
                    block_q: int = chunked.DEFAULT_BLOCK_Q,
                    block_k: int = chunked.DEFAULT_BLOCK_K) -> tuple[jax.Array, jax.Array]:
  """q [B, T, N, Hk]; k [B, S, (N,) Hk]; v [B, S, (N,) Hv]; positions and segment ids [B, T] / [B, S]
  -> (out [B, T, N, Hv], lse [B, T, N] float32), as `reference.attention`.

  `max_segments`: documents per row that the cuDNN path packs (more: that call runs the chunked path);
  `block_q` / `block_k`: the chunked path's tiles.
  """
  reason = cudnn.unsupported(q, k, v)
  if resolve_implementation(implementation, AVAILABLE, reason is None, gpu_choice="cudnn") == "xla":
    return chunked.attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, scale=scale, block_q=block_q, block_k=block_k)
  if reason is not None:
    raise ValueError(f"implementation='cudnn' cannot run these inputs ({reason}); allowed: 'xla' or None.")
  return _cudnn_or_chunked(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, float(scale),
                           max_segments, block_q, block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _cudnn_or_chunked(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, max_segments, block_q,
                      block_k):
  return _forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, max_segments, block_q,
                  block_k)[:2]


def _forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, max_segments, block_q,
             block_k):
  ok = cudnn.layout_ok(q_positions, kv_positions, q_segment_ids, kv_segment_ids, max_segments)
  out, lse = jax.lax.cond(
      ok, lambda: cudnn.forward(q, k, v, q_segment_ids, scale=scale, max_segments=max_segments),
      lambda: chunked.forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale=scale,
                              block_q=block_q, block_k=block_k))
  return out, lse, ok


def _cudnn_or_chunked_fwd(*args):
  inputs = tuple(a.value for a in args[:7])  # CustomVJPPrimal (symbolic zeros)
  out, lse, ok = _forward(*inputs, *args[7:])
  return (out, lse), (*inputs, out, lse, ok)


def _cudnn_or_chunked_bwd(scale, max_segments, block_q, block_k, res, cotangents):
  q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse, ok = res
  dout, dlse = cotangents
  dout = jnp.zeros_like(out) if isinstance(dout, SymbolicZero) else dout
  if isinstance(dlse, SymbolicZero):
    dlse = jnp.zeros_like(lse)
  else:
    ok = ok & jnp.all(dlse == 0)
  grads = jax.lax.cond(
      ok, lambda: cudnn.backward(q, k, v, q_segment_ids, out, lse, dout, scale=scale, max_segments=max_segments),
      lambda: chunked.backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse, dout,
                               dlse, scale=scale, block_q=block_q, block_k=block_k))
  return tuple(grads) + (None,) * 4


_cudnn_or_chunked.defvjp(_cudnn_or_chunked_fwd, _cudnn_or_chunked_bwd, symbolic_zeros=True)
