"""Mosaic GPU kernel for lightning-indexer scores (DeepSeek-V3.2 paper section 2.1; official `Indexer.forward`
computes the same I[t,s] = sum_j w[t,j] * ReLU(q[t,j] . k[s]) with DeepGEMM's `fp8_mqa_logits`).

One CTA owns a [BLOCK_T, key tile] block of scores. It loads the key tile once, then pipelines the index heads j
over 2 query-tile buffers: per head one wgmma q[t-tile, j] @ k[s-tile]^T (bf16 here, e4m3 in `kernel_fp8`; fp32
accumulate), and in that head's epilogue ReLU, the row scale w[t, j] and the head sum, all in registers; the
[T, I, S] logits never leave the chip. A pipeline step takes 2 heads when the head count is even: both wgmmas
are issued and the first head's epilogue runs while the second one computes. Causal + segment visibility is
applied in the final epilogue from positions and segment ids (`pallas_kernels/visibility.py`); tiles that are
certainly fully masked (all keys later than every query, or disjoint segment ranges) skip the matmuls and only
write -inf.

Why this shape: the per-head query tiles are the large operand (16 KiB per token in bf16). Consecutive CTAs
share one query tile (the grid's fastest axis runs over key tiles), so they are re-read from L2 rather than HBM,
and with many query columns per token (I x H >= TWO_KEY_WARPGROUPS_FROM_COLUMNS, V3.2's 64 x 128) two compute
warpgroups share each query tile over 2 x 128 keys while a third loads the tiles, halving that L2 traffic; with
few columns (the small parity models) one warpgroup over 128 keys is faster. Limits: H a multiple of 64, T a
multiple of 64 and S of the key tile (the API pads), forward only. Today's figure (4096 x 128K, V3.2 shapes,
H200): about 630 TF/s in bf16 and 1100 in FP8, benchmarks/index_topk.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_T = 64  # one warpgroup's wgmma M
BLOCK_S = 128  # keys per compute warpgroup
QUERY_BUFFERS = 2  # query-tile buffers of the head pipeline: with one key warpgroup two CTAs fit per SM
KEY_WARPGROUPS = (1, 2)  # compute warpgroups per CTA, splitting its key tile
MEMORY_REGISTERS = 40  # setmaxnreg of the query-loading warpgroup with two key warpgroups
KEY_ALIGN = 2 * BLOCK_S  # the API pads S to this: a multiple of every key tile
# Two key warpgroups from this many query columns (index heads x head dim) per token: V3.2's 64 x 128 = 8192 is
# faster with two, the parity model's 16 x 64 = 1024 with one; between them it is not measured.
TWO_KEY_WARPGROUPS_FROM_COLUMNS = 8192


def _tile_summaries(positions: jax.Array, segment_ids: jax.Array, block: int, reduce_position) -> jax.Array:
  """[B, L] -> int32 [B, L // block, 3]: (reduced position, min segment, max segment) per tile."""
  b, n = positions.shape
  pos = reduce_position(positions.reshape(b, n // block, block), axis=-1)
  seg = segment_ids.reshape(b, n // block, block)
  return jnp.stack([pos, seg.min(axis=-1), seg.max(axis=-1)], axis=-1).astype(jnp.int32)


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
                 q_segment_ids: jax.Array, kv_segment_ids: jax.Array, interpret=None,
                 key_warpgroups: int | None = None) -> jax.Array:
  """q [B, T, I, H] bf16, k [B, S, H] bf16, w [B, T, I] -> float32 [B, T, S] (as `reference.index_scores`).

  T must be a multiple of 64 and S of 128 x key_warpgroups (the API pads to KEY_ALIGN); key_warpgroups None:
  `default_key_warpgroups`.
  """
  return launch(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), w, None, q_positions=q_positions,
                kv_positions=kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                interpret=interpret, key_warpgroups=key_warpgroups)


def heads_per_step_for(num_heads: int) -> int:
  """Index heads per pipeline step: 2 (the second head's wgmma overlaps the first head's epilogue) when the
  heads are even, else 1."""
  return 2 if num_heads % 2 == 0 else 1


def default_key_warpgroups(num_heads: int, head_dim: int) -> int:
  """2 from TWO_KEY_WARPGROUPS_FROM_COLUMNS query columns per token (num_heads x head_dim), else 1."""
  return 2 if num_heads * head_dim >= TWO_KEY_WARPGROUPS_FROM_COLUMNS else 1


def launch(q: jax.Array, k: jax.Array, w: jax.Array, k_scale: jax.Array | None, *, q_positions: jax.Array,
           kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array, interpret=None,
           key_warpgroups: int | None = None) -> jax.Array:
  """The scores kernel for q [B, T, I, H] and k [B, S, H] of one wgmma dtype (bf16 here, e4m3 in `kernel_fp8`).

  k_scale [B, S] float32 (or None): a per-key factor applied to each score column in the epilogue.
  key_warpgroups: 1, or 2 compute warpgroups sharing each query tile over twice the keys; None:
  `default_key_warpgroups`.
  """
  if key_warpgroups is None:
    key_warpgroups = default_key_warpgroups(*q.shape[2:])
  if key_warpgroups not in KEY_WARPGROUPS:
    raise ValueError(f"key_warpgroups={key_warpgroups} must be one of {KEY_WARPGROUPS}.")
  B, T, I, H = q.shape  # noqa: N806
  S = k.shape[1]  # noqa: N806
  cta_keys = BLOCK_S * key_warpgroups
  if T % BLOCK_T or S % cta_keys:
    raise ValueError(f"T={T} must be a multiple of {BLOCK_T} and S={S} of {cta_keys} (key_warpgroups="
                     f"{key_warpgroups}).")
  q_flat = q.reshape(B, T, I * H)
  w_heads = jnp.swapaxes(w.astype(jnp.float32), 1, 2)  # [B, I, T]: one contiguous row of w per head
  q_summary = _tile_summaries(q_positions, q_segment_ids, BLOCK_T, jnp.max)
  kv_summary = _tile_summaries(kv_positions, kv_segment_ids, cta_keys, jnp.min)
  ints = [x.astype(jnp.int32) for x in (q_positions, q_segment_ids, kv_positions, kv_segment_ids)]
  k_scales = [] if k_scale is None else [k_scale.astype(jnp.float32)]

  itemsize = jnp.dtype(q.dtype).itemsize
  swizzle = plgpu.find_swizzle(H * 8 * itemsize)  # rows of H elements
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  two = key_warpgroups == 2
  body = functools.partial(_kernel_two_warpgroups if two else _kernel, num_heads=I, head_dim=H,
                           transforms=transforms, heads_per_step=heads_per_step_for(I))
  scratch = dict(
      k_smem=plgpu.SMEM((cta_keys, H), q.dtype, transforms=transforms),
      w_smem=plgpu.SMEM((I, BLOCK_T), jnp.float32),
      q_pos_smem=plgpu.SMEM((2, BLOCK_T), jnp.int32),
      kv_pos_smem=plgpu.SMEM((2, cta_keys), jnp.int32),
      k_scale_smem=[plgpu.SMEM((cta_keys,), jnp.float32) for _ in k_scales],
      out_smem=plgpu.SMEM((2, BLOCK_T, BLOCK_S) if two else (BLOCK_T, BLOCK_S), jnp.float32),
      barriers=plgpu.Barrier(num_barriers=6 + len(k_scales)),
  )
  threads = dict(num_threads=3, thread_name="wg") if two else {}
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((B, T, S), jnp.float32),
      scratch_types=scratch,
      grid=(S // cta_keys, T // BLOCK_T, B),
      grid_names=("s", "t", "b"),
      **threads,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
  )(q_flat, k, w_heads, *ints, q_summary, kv_summary, *k_scales)


def _head_step(k_tile, w_smem, head_dim: int, heads_per_step: int):
  """The pipeline body over index heads: (step index, q tile [BLOCK_T, heads_per_step * H], running head sum) ->
  head sum + sum over the step's heads j of w[t, j] * ReLU(q[t, j] . k_tile[s]), with k_tile [BLOCK_S, H]."""
  rows = plgpu.Layout.WGMMA.reduce(1)

  def epilogue(acc, logits, head):
    w_h = plgpu.load(w_smem.at[head], layout=rows)
    return acc + jnp.maximum(logits, 0.0) * lax.broadcast_in_dim(w_h, logits.shape, [0])

  def head_step(idx, q_smem, acc):
    (j,) = idx
    if heads_per_step == 1:
      def logits_of(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
        return acc_ref[...]

      return epilogue(acc, pl.run_scoped(logits_of, plgpu.ACC((BLOCK_T, BLOCK_S), jnp.float32)), j)

    def both_heads(first_ref, second_ref):  # the second wgmma runs during the first head's epilogue
      for h, ref in enumerate((first_ref, second_ref)):
        plgpu.wgmma(ref, q_smem.at[:, pl.ds(h * head_dim, head_dim)], k_tile.transpose((1, 0)))
      out = epilogue(acc, plgpu.wgmma_accumulator_load(first_ref, wait_n=1), 2 * j)
      return epilogue(out, plgpu.wgmma_accumulator_load(second_ref, wait_n=0), 2 * j + 1)

    return pl.run_scoped(both_heads, *[plgpu.ACC((BLOCK_T, BLOCK_S), jnp.float32)] * 2)

  return head_step


def _visible(scores, q_pos_smem, kv_pos_smem, k_scale_smem):
  """The final epilogue of a [BLOCK_T, BLOCK_S] tile: per-key scales, then -inf where the key is not visible."""
  rows = plgpu.Layout.WGMMA.reduce(1)
  cols = plgpu.Layout.WGMMA.reduce(0)
  shape = scores.shape
  q_pos = lax.broadcast_in_dim(plgpu.load(q_pos_smem.at[0], layout=rows), shape, [0])
  q_seg = lax.broadcast_in_dim(plgpu.load(q_pos_smem.at[1], layout=rows), shape, [0])
  kv_pos = lax.broadcast_in_dim(plgpu.load(kv_pos_smem[0], layout=cols), shape, [1])
  kv_seg = lax.broadcast_in_dim(plgpu.load(kv_pos_smem[1], layout=cols), shape, [1])
  for smem in k_scale_smem:  # a power of two in the fp8 kernel: commutes with ReLU and the head sum exactly
    scores = scores * lax.broadcast_in_dim(plgpu.load(smem, layout=cols), shape, [1])
  visible = (kv_pos <= q_pos) & (kv_seg == q_seg)
  return jnp.where(visible, scores, -jnp.inf)


def _tile(cta_keys: int, refs, smem):
  """The CTA's tile: (b, ti, t_slice, s_slice, live, copies), ti its row-tile index. live is False when the tile is
  certainly fully masked (`_tile_summaries`: all keys later, or disjoint segments); copies are the (source,
  destination) pairs of the tile-wide operands: keys, w, query and key positions / segments, key scales."""
  k_ref, w_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_sum_ref, kv_sum_ref, k_scale_ref = refs
  k_smem, w_smem, q_pos_smem, kv_pos_smem, k_scale_smem = smem
  si, ti, b = lax.axis_index("s"), lax.axis_index("t"), lax.axis_index("b")
  t_slice, s_slice = pl.ds(ti * BLOCK_T, BLOCK_T), pl.ds(si * cta_keys, cta_keys)
  live = ((kv_sum_ref[b, si, 0] <= q_sum_ref[b, ti, 0]) & (kv_sum_ref[b, si, 1] <= q_sum_ref[b, ti, 2])
          & (kv_sum_ref[b, si, 2] >= q_sum_ref[b, ti, 1]))
  copies = ((k_ref.at[b, s_slice], k_smem), (w_ref.at[b, :, t_slice], w_smem),
            (q_pos_ref.at[b, t_slice], q_pos_smem.at[0]), (q_seg_ref.at[b, t_slice], q_pos_smem.at[1]),
            (kv_pos_ref.at[b, s_slice], kv_pos_smem.at[0]), (kv_seg_ref.at[b, s_slice], kv_pos_smem.at[1]),
            *[(ref.at[b, s_slice], smem) for ref, smem in zip(k_scale_ref, k_scale_smem)])
  return b, ti, t_slice, s_slice, live, copies


def _kernel(q_ref, k_ref, w_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_sum_ref, kv_sum_ref,
            *k_scale_and_out, k_smem, w_smem, q_pos_smem, kv_pos_smem, k_scale_smem, out_smem, barriers, num_heads,
            head_dim, transforms, heads_per_step):
  """One warpgroup per CTA: a [BLOCK_T, BLOCK_S] tile."""
  *k_scale_ref, out_ref = k_scale_and_out  # k_scale_ref and k_scale_smem: one ref each with key scales, or none
  b, ti, t_slice, s_slice, live, copies = _tile(
      BLOCK_S, (k_ref, w_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_sum_ref, kv_sum_ref, k_scale_ref),
      (k_smem, w_smem, q_pos_smem, kv_pos_smem, k_scale_smem))

  @pl.when(live)
  def _compute():
    for i, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])
    for i in range(len(copies)):
      plgpu.barrier_wait(barriers.at[i])
    zeros = plgpu.layout_cast(jnp.zeros((BLOCK_T, BLOCK_S), jnp.float32), plgpu.Layout.WGMMA)
    scores = plgpu.emit_pipeline(
        _head_step(k_smem, w_smem, head_dim, heads_per_step), grid=(num_heads // heads_per_step,),
        in_specs=[plgpu.BlockSpec((BLOCK_T, heads_per_step * head_dim), lambda j: (ti, j), transforms=transforms)],
        max_concurrent_steps=min(QUERY_BUFFERS, num_heads // heads_per_step), init_carry=zeros,
    )(q_ref.at[b])
    out_smem[...] = _visible(scores, q_pos_smem, (kv_pos_smem.at[0], kv_pos_smem.at[1]), k_scale_smem)

  @pl.when(jnp.logical_not(live))
  def _skip():
    out_smem[...] = jnp.full((BLOCK_T, BLOCK_S), -jnp.inf, jnp.float32)

  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, t_slice, s_slice])
  plgpu.wait_smem_to_gmem(0)


def _kernel_two_warpgroups(q_ref, k_ref, w_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_sum_ref, kv_sum_ref,
                           *k_scale_and_out, k_smem, w_smem, q_pos_smem, kv_pos_smem, k_scale_smem, out_smem,
                           barriers, num_heads, head_dim, transforms, heads_per_step):
  """Two compute warpgroups per CTA share one stream of query tiles (`KEY_WARPGROUPS`): wg 0 and wg 1 score keys
  [0, BLOCK_S) and [BLOCK_S, 2 BLOCK_S) of a 2 BLOCK_S key tile; wg 2 loads the query tiles
  (`emit_pipeline_warp_specialized`). out_smem [2, BLOCK_T, BLOCK_S]: one slot per compute warpgroup."""
  *k_scale_ref, out_ref = k_scale_and_out
  b, ti, t_slice, s_slice, live, copies = _tile(
      2 * BLOCK_S, (k_ref, w_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_sum_ref, kv_sum_ref, k_scale_ref),
      (k_smem, w_smem, q_pos_smem, kv_pos_smem, k_scale_smem))
  wg = lax.axis_index("wg")
  half = pl.ds(wg * BLOCK_S, BLOCK_S)  # this compute warpgroup's keys inside the CTA's tile

  @pl.when(live)
  def _compute():
    @pl.when(wg == 0)
    def _issue():
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])

    def compute_context(pipeline):
      for i in range(len(copies)):
        plgpu.barrier_wait(barriers.at[i])
      scores = pipeline(plgpu.layout_cast(jnp.zeros((BLOCK_T, BLOCK_S), jnp.float32), plgpu.Layout.WGMMA))
      out_smem.at[wg][...] = _visible(scores, q_pos_smem, (kv_pos_smem.at[0, half], kv_pos_smem.at[1, half]),
                                      [smem.at[half] for smem in k_scale_smem])

    plgpu.emit_pipeline_warp_specialized(
        _head_step(k_smem.at[half], w_smem, head_dim, heads_per_step), grid=(num_heads // heads_per_step,),
        memory_registers=MEMORY_REGISTERS,
        in_specs=[plgpu.BlockSpec((BLOCK_T, heads_per_step * head_dim), lambda j: (ti, j), transforms=transforms,
                                  memory_space=plgpu.SMEM)],
        max_concurrent_steps=min(QUERY_BUFFERS, num_heads // heads_per_step), wg_axis="wg", num_compute_wgs=2,
        compute_context=compute_context,
    )(q_ref.at[b])

  @pl.when(jnp.logical_not(live) & (wg < 2))
  def _skip():
    out_smem.at[wg][...] = jnp.full((BLOCK_T, BLOCK_S), -jnp.inf, jnp.float32)

  @pl.when(wg < 2)
  def _store():
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[b, t_slice, pl.ds(s_slice.start + wg * BLOCK_S, BLOCK_S)])
    plgpu.wait_smem_to_gmem(0)
