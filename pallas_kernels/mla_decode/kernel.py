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
row 0 from L2). bf16 cache only (kernel_fwd's gather copies bf16 rows); see `supports`.
"""

import jax

from pallas_kernels.mla_decode import split_k
from pallas_kernels.sparse_mla import kernel_fwd


def supports(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array) -> bool:
  """Whether the kernel handles these widths and dtypes: a bf16 cache with kernel_fwd's widths."""
  c = kv_nope.shape[-1]
  return (kv_scale is None and kernel_fwd.supports(c + kv_rope.shape[-1], c, q.dtype)
          and kv_nope.dtype == q.dtype and kv_rope.dtype == q.dtype)


def sparse_mla_decode(q: jax.Array, kv_nope: jax.Array, kv_scale: jax.Array | None, kv_rope: jax.Array,
                      indices: jax.Array, *, scale: float, num_splits: int,
                      interpret=False) -> tuple[jax.Array, jax.Array]:
  """q [Q, N, C + R], kv_nope [rows, C], kv_scale None, kv_rope [rows, R], indices [Q, K] (-1 = skip)
  -> (out [Q, N, C] in q's dtype, lse [Q, N]). `interpret`: GPU interpret params (CPU tests) or False."""
  if not supports(q, kv_nope, kv_scale, kv_rope):
    raise ValueError(f"mla_decode.kernel: q {q.dtype}{q.shape}, kv_nope {kv_nope.dtype}{kv_nope.shape}, kv_scale "
                     f"{None if kv_scale is None else kv_scale.shape}, kv_rope {kv_rope.dtype}{kv_rope.shape} are not "
                     "supported; allowed: a bf16 cache (kv_scale None), C a multiple of 128 up to 512, R a "
                     "multiple of 64 up to 256.")
  rows, heads = q.shape[:2]
  c = kv_nope.shape[-1]
  split = split_k.split_indices(indices.astype("int32"), num_splits)
  out, lse = kernel_fwd.sparse_mla_fwd(q[None], kv_nope[None], split[None], scale=scale, v_dim=c,
                                       interpret=interpret, kv_rope=kv_rope[None], splits=num_splits)
  out, lse = out[0].reshape(rows, num_splits, heads, c), lse[0].reshape(rows, num_splits, heads)
  if num_splits == 1:
    return out[:, 0], lse[:, 0]
  out, lse = split_k.merge(out, lse)
  return out.astype(q.dtype), lse
