"""Sparse and dense MLA decode on Hopper: the sparse MLA forward kernel over the pool's rows, split-K, XLA merge.

A decode CTA of FlashMLA (64 heads of one query row, its selected entries gathered block by block, QK^T and PV by
wgmma over 576 / 512 columns, online softmax) is exactly a CTA of our sparse MLA forward (`sparse_mla.kernel_fwd`),
so decoding reuses that kernel rather than copying it: the query rows of the batch are its tokens (B = 1), the
flattened page pool is its key array, read through the cache's two arrays (latent and rope parts, `kv_rope=`), and
the indices are pool rows. What decoding adds is split-K (`split_k`): each row's keys in P parts of whole 64-key
blocks, one partial (out, lse) per part (the kernel's `splits=`: the part's CTA reads query row r // P), merged in
XLA. Partials are bf16 (the kernel's output dtype): the merge adds one bf16 rounding of each part, at most 2^-9
relative, to the final rounding of out.

Dense decoding is the same kernel on every visible row (`reference.dense_rows`: block table -> pool rows, -1 past
the row's length): a page is 64 consecutive pool rows, so the row gather reads whole 128-byte lines as a page copy
would; the int32 index per key adds 4 bytes to the 1152 of a bf16 entry. Limits: the keys of all rows are padded to
the block table's max_pages * page_size, and parts past a row's length still run (masked; their gathers read
row 0 from L2). An FP8 cache (e4m3 latent, a float32 scale per 128 values, bf16 rope) runs kernel_fwd's FP8 variant
(`kv_scale=`: e4m3 rows gathered, dequantised to bf16 in SMEM by the compute warpgroups; checked on CPU only so far).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.mla_decode import split_k
from pallas_kernels.sparse_mla import kernel_fwd


def supports(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array) -> bool:
  """Whether the kernel handles these widths and dtypes: kernel_fwd's widths, a bf16 cache or an FP8 one
  (float8_e4m3fn latent with its scales, C a multiple of 256, R = 64)."""
  c = kv_nope.shape[-1]
  fp8 = kv_scale is not None
  return (kernel_fwd.supports(c + kv_rope.shape[-1], c, q.dtype, fp8_cache=fp8) and kv_rope.dtype == q.dtype
          and kv_nope.dtype == (jnp.float8_e4m3fn if fp8 else q.dtype))


def sparse_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                      indices: jax.Array, *, scale: float, num_splits: int,
                      interpret=False) -> tuple[jax.Array, jax.Array]:
  """q [Q, N, C + R], kv_nope [rows, C], kv_scale [rows, C / 128] | None, kv_rope [rows, R], indices [Q, K] (-1 = skip)
  -> (out [Q, N, C] in q's dtype, lse [Q, N]). `interpret`: GPU interpret params (CPU tests) or False."""
  if not supports(q, kv_nope, kv_scale, kv_rope):
    raise ValueError(f"mla_decode.kernel: q {q.dtype}{q.shape}, kv_nope {kv_nope.dtype}{kv_nope.shape}, kv_scale "
                     f"{None if kv_scale is None else kv_scale.shape}, kv_rope {kv_rope.dtype}{kv_rope.shape} are not "
                     "supported; allowed: a bf16 cache (kv_scale None), C a multiple of 128 up to 512, R a "
                     "multiple of 64 up to 256; or an FP8 cache, C a multiple of 256 up to 512, R = 64.")
  rows, heads = q.shape[:2]
  c = kv_nope.shape[-1]
  split = split_k.split_indices(indices.astype("int32"), num_splits)
  out, lse = kernel_fwd.sparse_mla_fwd(q[None], kv_nope[None], split[None], scale=scale, v_dim=c,
                                       interpret=interpret, kv_rope=kv_rope[None], splits=num_splits,
                                       kv_scale=None if kv_scale is None else kv_scale[None])
  out, lse = out[0].reshape(rows, num_splits, heads, c), lse[0].reshape(rows, num_splits, heads)
  if num_splits == 1:
    return out[:, 0], lse[:, 0]
  out, lse = split_k.merge(out, lse)
  return out.astype(q.dtype), lse
