"""Multi-head latent attention with the DSA indexer (DeepSeek-V2 section 2.1; V3.2 paper section 2).

Official `MLA.forward` / HF `DeepseekV32Attention`. Two modes compute the same function (spec section 1):
  * "mha": expand the latent c into per-head k_nope and v with wkv_b; q/k heads are [nope | rope] (192 dims);
  * "mqa": absorb W_UK into the query (q_nope' = q_nope . W_UK[h], 512 dims) so every token's key is one
    shared 576-dim entry [c | k_rope] and its value is c; the output is projected by W_UV[h] afterwards.
Dense attention runs either mode; sparse attention (DSA) runs MQA mode over the indexer's top-k entries,
gathered by `pallas_kernels.sparse_mla.api` (never a [T, S] mask).

Long rows (`AttentionOptions.q_chunk`): the per-query work after the shared entries, the indexer inputs and
the top-k selection (all tokens at once) runs `q_chunk` queries at a time under `jax.checkpoint`: the query
heads, the attention core, the output projection and `aux_reducer` (the training step's indexer KL). At
V3.2's 128 heads and 128K tokens the absorbed queries alone are [T, 128, 576] bf16 = 18 GiB, the latent
outputs 16 GiB and the backward pass doubles both; a chunk holds T / q_chunk of that. The price is one more
forward pass of the chunk in the backward pass. `aux_reducer(aux, layout) -> pytree` turns a layer's (or a
chunk's) `AttentionAux` into the few values a loss needs, summed over the chunks, so that the [T, N, C]
tensors never leave the layer: under rematerialisation they are rebuilt in its backward pass, not kept.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsa_jax.model import paged_cache, rope
from dsa_jax.model.config import IndexerConfig, MLAConfig
from dsa_jax.model.indexer import Indexer, IndexerInputs, select
from dsa_jax.model.kv_cache import LayerCache
from dsa_jax.model.layers import ATTENTION_LSE, CHUNKED_OUTPUT, TOPK_INDICES, RMSNorm, constrain, param
from pallas_kernels.flash_attention import cudnn
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.sparse_mla import api as sparse_mla_api

ATTENTION_KINDS = ("dense", "sparse")
MLA_MODES = ("mha", "mqa")
# Logical axes of the per-token key entries shared by all heads ([c | k_rope], the indexer key): under
# context parallelism they are gathered over the sequence shards while the queries stay local.
KV_ENTRY_AXES = ("act_batch", "act_kv_length", None)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where the tokens of a forward pass sit: positions and document ids of queries and keys, RoPE tables."""
  q_positions: jax.Array  # [B, T]
  kv_positions: jax.Array  # [B, S]
  q_segment_ids: jax.Array  # [B, T]
  kv_segment_ids: jax.Array  # [B, S]
  cos: jax.Array  # [B, T, R/2]
  sin: jax.Array  # [B, T, R/2]


jax.tree_util.register_dataclass(
    TokenLayout, data_fields=["q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids", "cos", "sin"],
    meta_fields=[])


@dataclasses.dataclass(frozen=True)
class MQAOperands:
  """The absorbed queries and shared key entries of MQA mode: the indexer's KL target is recomputed from them."""
  q: jax.Array  # [B, T, N, C + R]: [q_nope . W_UK | q_rope]
  kv: jax.Array  # [B, S, C + R]: [c | k_rope]


@dataclasses.dataclass(frozen=True)
class AttentionAux:
  """What one layer's attention hands to training and sampling; None where a field does not apply."""
  lse: jax.Array | None  # [B, T, N] float32 log-sum-exp of the scaled attention logits (None before attending)
  mqa: MQAOperands | None = None  # MQA mode, or MHA mode with AttentionOptions.mqa_operands
  topk_indices: jax.Array | None = None  # [B, T, K] int32, ascending, -1 padded: sparse attention only
  indexer: IndexerInputs | None = None  # models with an indexer (keys of the whole cache when decoding)
  cache: LayerCache | None = None  # the updated layer cache when decoding (collected into ModelOutput.cache)


jax.tree_util.register_dataclass(MQAOperands, data_fields=["q", "kv"], meta_fields=[])
jax.tree_util.register_dataclass(AttentionAux, data_fields=["lse", "mqa", "topk_indices", "indexer", "cache"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """How to run attention: dense or sparse (DSA), MLA mode, kernel implementation, query chunks and the aux
  reducer (module docstring).

  `mqa_operands` makes MHA mode also return the MQA operands (absorbed queries, latent entries): the dense
  warm-up attends in MHA mode, whose head dims (192 / 128) cuDNN's flash attention takes, while its indexer KL
  recomputes the target from the MQA form. Both modes compute the same function, so the lse is the same.
  """
  kind: str = "sparse"
  mode: str | None = None  # None: "mha" for dense, "mqa" for sparse
  implementation: str | None = None
  mqa_operands: bool = False
  q_chunk: int = 0  # queries per chunk (a divisor of T); 0: all at once
  aux_reducer: Callable[["AttentionAux", "TokenLayout"], Any] | None = None

  def __post_init__(self):
    if not (isinstance(self.q_chunk, int) and self.q_chunk >= 0):
      raise ValueError(f"q_chunk={self.q_chunk!r} is invalid; allowed: 0 (no chunks) or a positive integer.")
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"attention={self.kind!r} is invalid; allowed: {ATTENTION_KINDS}.")
    if self.mode is not None and self.mode not in MLA_MODES:
      raise ValueError(f"mla_mode={self.mode!r} is invalid; allowed: {MLA_MODES} or None.")
    if self.kind == "sparse" and self.mode == "mha":
      raise ValueError("mla_mode='mha' is invalid with attention='sparse'; allowed: 'mqa' (DSA gathers the "
                       "shared latent entries).")

  @property
  def resolved_mode(self) -> str:
    return self.mode or ("mha" if self.kind == "dense" else "mqa")


class MLA(nnx.Module):
  """MLA parameters (HF names in comments) and the attention of one layer."""

  def __init__(self, cfg: MLAConfig, indexer: IndexerConfig | None, *, hidden: int, softmax_scale: float,
               rngs: nnx.Rngs, dtype: str, param_dtype: str, std: float, indexer_fp8: bool = False):
    n, c = cfg.num_heads, cfg.kv_lora_rank
    self.cfg = cfg
    self.dtype = dtype
    self.softmax_scale = softmax_scale
    self.wq_a = param(rngs, (hidden, cfg.q_lora_rank), ("embed", "q_lora"), param_dtype, std)  # q_a_proj
    # q/kv latent norms use eps 1e-6 whatever the config says (official `MLA.__init__`, HF q_a_layernorm).
    self.q_norm = RMSNorm(cfg.q_lora_rank, "q_lora", eps=1e-6, param_dtype=param_dtype)  # q_a_layernorm
    self.wq_b = param(rngs, (cfg.q_lora_rank, n, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), param_dtype,
                      std)  # q_b_proj
    self.wkv_a = param(rngs, (hidden, cfg.latent_dim), ("embed", "kv_lora"), param_dtype, std)  # kv_a_proj_with_mqa
    self.kv_norm = RMSNorm(c, "kv_lora", eps=1e-6, param_dtype=param_dtype)  # kv_a_layernorm
    self.wkv_b = param(rngs, (c, n, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "head_dim"),
                       param_dtype, std)  # kv_b_proj
    self.wo = param(rngs, (n, cfg.v_head_dim, hidden), ("heads", "head_dim", "embed"), param_dtype, std)  # o_proj
    self.indexer = None if indexer is None else Indexer(
        indexer, hidden=hidden, q_lora_rank=cfg.q_lora_rank, rope_dim=cfg.qk_rope_head_dim, rngs=rngs, dtype=dtype,
        param_dtype=param_dtype, std=std, fp8_numerics=indexer_fp8)
    self.topk = None if indexer is None else indexer.topk

  def _w(self, p: nnx.Param) -> jax.Array:
    return p[...].astype(self.dtype)

  def query_latent(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> q_latent [B, T, Cq] (normalised: the input of the query heads and of the indexer)."""
    return self.q_norm(jnp.einsum("btd,dc->btc", x, self._w(self.wq_a)))

  def queries(self, q_latent: jax.Array, layout: TokenLayout) -> tuple[jax.Array, jax.Array]:
    """q_latent [B, T, Cq] -> q_nope [B, T, N, P], q_rope [B, T, N, R] (RoPE applied)."""
    q = jnp.einsum("btc,cnh->btnh", q_latent, self._w(self.wq_b))
    p = self.cfg.qk_nope_head_dim
    return q[..., :p], rope.apply_interleaved(q[..., p:], layout.cos, layout.sin)

  def latents(self, x: jax.Array, layout: TokenLayout) -> tuple[jax.Array, jax.Array]:
    """-> c [B, S, C] (normalised latent), k_rope [B, S, R] (RoPE applied); the MQA entry is [c | k_rope]."""
    kv = jnp.einsum("btd,dc->btc", x, self._w(self.wkv_a))
    c = self.kv_norm(kv[..., :self.cfg.kv_lora_rank])
    return c, rope.apply_interleaved(kv[..., self.cfg.kv_lora_rank:], layout.cos, layout.sin)

  def __call__(self, x: jax.Array, layout: TokenLayout, options: AttentionOptions,
               cache: LayerCache | paged_cache.PagedLayer | None = None) -> tuple[jax.Array, AttentionAux]:
    """x [B, T, D] (normed) -> (out [B, T, D], AttentionAux: top-k indices and indexer inputs when DSA runs).

    With `cache` (decoding, `kv_cache`): the T new latent entries and indexer keys are appended, the queries
    attend over every cached slot (layout.kv_* describe the cache), and AttentionAux.cache is the updated cache.
    A `paged_cache.PagedLayer` decodes through the page pool instead (`_paged`).
    """
    x = x.astype(self.dtype)
    q_latent = self.query_latent(x)
    c, k_rope = self.latents(x, layout)
    c, k_rope = constrain(c, KV_ENTRY_AXES), constrain(k_rope, KV_ENTRY_AXES)
    indexer = topk_indices = None
    if self.indexer is not None:
      # The indexer's input is detached (paper section 2.1.1): it learns only from its KL loss, and that loss
      # never reaches the main model. Its discrete selection gives the LM loss no path into the indexer.
      inputs = self.indexer.project(jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent), layout.cos,
                                    layout.sin)
      indexer = IndexerInputs(q=inputs.q, k=constrain(inputs.k, KV_ENTRY_AXES), w=inputs.w)
    if options.kind == "sparse" and indexer is None:
      raise ValueError("attention='sparse' needs an indexer, but this model has none (a dense DeepSeek-V3 "
                       "config); allowed: attention='dense'.")
    if isinstance(cache, paged_cache.PagedLayer):
      return self._paged(q_latent, c, k_rope, indexer, layout, options, cache)
    if cache is not None:
      c, k_rope, indexer, cache = self._read_through(cache, c, k_rope, indexer)
    if options.kind == "sparse":
      topk_indices = checkpoint_name(select(
          indexer, self.topk, q_positions=layout.q_positions, kv_positions=layout.kv_positions,
          q_segment_ids=layout.q_segment_ids, kv_segment_ids=layout.kv_segment_ids,
          implementation=options.implementation, fp8_numerics=self.indexer.fp8_numerics), TOPK_INDICES)
    aux = AttentionAux(lse=None, topk_indices=topk_indices, indexer=indexer, cache=cache)
    if options.q_chunk and options.q_chunk < x.shape[1] and cache is None:
      return self._chunked(q_latent, c, k_rope, layout, options, aux)
    out, aux = self._attend(q_latent, c, k_rope, layout, options, aux)
    return out, aux if options.aux_reducer is None else options.aux_reducer(aux, layout)

  def _attend(self, q_latent, c, k_rope, layout, options, aux: AttentionAux) -> tuple[jax.Array, AttentionAux]:
    """The per-query part: query heads, attention core, output projection -> (out [B, T, D], aux with lse)."""
    q_nope, q_rope = self.queries(q_latent, layout)
    w_uk, w_uv = self._absorbed()
    mqa = None
    if options.resolved_mode == "mha":
      out, lse = self._mha(q_nope, q_rope, c, k_rope, w_uk, w_uv, layout, options)
      if options.mqa_operands:
        mqa = self._mqa_operands(q_nope, q_rope, c, k_rope, w_uk)
    else:
      out, lse, mqa = self._mqa(q_nope, q_rope, c, k_rope, w_uk, w_uv, layout, options, aux.topk_indices)
    lse = checkpoint_name(lse, ATTENTION_LSE)
    return jnp.einsum("btnv,nvd->btd", out, self._w(self.wo)), dataclasses.replace(aux, lse=lse, mqa=mqa)

  def _absorbed(self) -> tuple[jax.Array, jax.Array]:
    """W_UK [C, N, P] and W_UV [C, N, V]: the halves of wkv_b that MQA mode absorbs into queries and outputs."""
    wkv_b = self._w(self.wkv_b)
    return wkv_b[..., :self.cfg.qk_nope_head_dim], wkv_b[..., self.cfg.qk_nope_head_dim:]

  def _paged(self, q_latent, c, k_rope, indexer: IndexerInputs | None, layout: TokenLayout, options: AttentionOptions,
             cache: paged_cache.PagedLayer) -> tuple[jax.Array, AttentionAux]:
    """Decoding through the page pool: write the T new entries at layout.q_positions, then attend in MQA mode
    (whatever `options.mode`: the pool holds latent entries) with the decode kernels (`paged_cache.attend`).
    aux.topk_indices are logical positions, -1 padded to the indexer's top-k."""
    cache = cache.write(layout.q_positions, c, k_rope, None if indexer is None else indexer.k)
    q_nope, q_rope = self.queries(q_latent, layout)
    w_uk, w_uv = self._absorbed()
    q = self._mqa_operands(q_nope, q_rope, c, k_rope, w_uk).q
    out_latent, lse, topk_indices = paged_cache.attend(
        cache, q, indexer, layout.q_positions, kind=options.kind, topk=self.topk, scale=self.softmax_scale,
        implementation=options.implementation)
    out = jnp.einsum("btnc,cnv->btnv", out_latent, w_uv)
    aux = AttentionAux(lse=lse, topk_indices=topk_indices, indexer=indexer, cache=cache)
    return jnp.einsum("btnv,nvd->btd", out, self._w(self.wo)), aux

  def _chunked(self, q_latent, c, k_rope, layout, options, aux: AttentionAux) -> tuple[jax.Array, Any]:
    """`_attend` (and the reducer) over query chunks, each rematerialised -> (out, reduced aux summed)."""
    if options.aux_reducer is None:
      raise ValueError("q_chunk > 0 needs an aux_reducer: the per-query aux of every chunk would otherwise be "
                       "kept whole; allowed: q_chunk=0, or pass aux_reducer.")
    b, t = q_latent.shape[:2]
    if t % options.q_chunk:
      raise ValueError(f"q_chunk={options.q_chunk} is invalid for {t} queries; allowed: a divisor of T.")
    n = t // options.q_chunk
    split = lambda x: jnp.moveaxis(x.reshape(b, n, options.q_chunk, *x.shape[2:]), 1, 0)  # [n, B, T/n, ...]
    indexer = aux.indexer
    per_query = dict(q_latent=q_latent, q_positions=layout.q_positions, q_segment_ids=layout.q_segment_ids,
                     cos=layout.cos, sin=layout.sin, topk_indices=aux.topk_indices,
                     index_q=None if indexer is None else indexer.q, index_w=None if indexer is None else indexer.w)
    # The keys' gradients add up over the chunks: in float32 copies (cast back inside, so the forward is
    # unchanged) they are rounded once, not once per chunk.
    keys = {"c": c, "k_rope": k_rope, "index_k": None if indexer is None else indexer.k}
    keys32 = jax.tree.map(lambda x: x.astype(jnp.float32), keys)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(ATTENTION_LSE))
    def chunk(xs, chunk_keys32=keys32, kv_layout=None):
      chunk_layout = dataclasses.replace(layout, q_positions=xs["q_positions"], q_segment_ids=xs["q_segment_ids"],
                                         cos=xs["cos"], sin=xs["sin"], **(kv_layout or {}))
      k = jax.tree.map(lambda x32, x: x32.astype(x.dtype), chunk_keys32, keys)
      chunk_indexer = None if indexer is None else IndexerInputs(q=xs["index_q"], k=k["index_k"], w=xs["index_w"])
      chunk_aux = AttentionAux(lse=None, topk_indices=xs["topk_indices"], indexer=chunk_indexer)
      out, chunk_aux = self._attend(xs["q_latent"], k["c"], k["k_rope"], chunk_layout, options, chunk_aux)
      return out, options.aux_reducer(chunk_aux, chunk_layout)

    if options.kind == "dense" and c.shape[1] == t:
      out, reduced = self._causal_chunks(chunk, per_query, keys32, layout, n)
    else:
      out, reduced = jax.lax.map(chunk, jax.tree.map(split, per_query))
      out, reduced = jnp.moveaxis(out, 0, 1).reshape(b, t, -1), jax.tree.map(lambda x: x.sum(0), reduced)
    return checkpoint_name(out, CHUNKED_OUTPUT), jax.tree.map(lambda x: checkpoint_name(x, CHUNKED_OUTPUT), reduced)

  @staticmethod
  def _causal_chunks(chunk, per_query, keys32, layout, n):
    """Dense attention's query chunks, chunk i over the keys up to its last query only (an unrolled loop: the
    key counts differ). Half the work of every chunk over all keys, and on the GPU each chunk is the last keys
    of its row, which cuDNN takes (`flash_attention.cudnn`): the expanded MHA keys and their gradients exist
    for one chunk's keys at a time, not whole-row queries, outputs and cuDNN's dq accumulator as well.

    Exact when no key after a query is visible to it: the queries are the keys in document order
    (`cudnn.layout_ok` with any number of documents), as training rows are. Any other layout makes the
    outputs NaN (checked at run time; the training loop stops on a non-finite loss), never a silent error.
    """
    t = layout.q_positions.shape[1]
    size = t // n
    ordered = cudnn.layout_ok(layout.q_positions, layout.kv_positions, layout.q_segment_ids, layout.kv_segment_ids,
                              max_segments=t)
    outs, reduced = [], []
    for i in range(n):
      queries = jax.tree.map(lambda x: x[:, i * size:(i + 1) * size], per_query)
      end = (i + 1) * size
      visible = dict(kv_positions=layout.kv_positions[:, :end], kv_segment_ids=layout.kv_segment_ids[:, :end])
      out, chunk_reduced = chunk(queries, jax.tree.map(lambda x: x[:, :end], keys32), visible)
      outs.append(out)
      reduced.append(chunk_reduced)
    poison = lambda x: jnp.where(ordered, x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x
    reduced = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *reduced)
    return poison(jnp.concatenate(outs, axis=1)), jax.tree.map(poison, reduced)

  def _read_through(self, cache: LayerCache, c, k_rope, indexer: IndexerInputs | None):
    """Appends this step's entries to the cache -> the whole cache as keys (MQA entries, indexer inputs with
    every cached indexer key) and the updated cache."""
    cache = cache.append(jnp.concatenate([c, k_rope], axis=-1), None if indexer is None else indexer.k)
    if indexer is not None:
      indexer = dataclasses.replace(indexer, k=cache.index_k)
    c_dim = self.cfg.kv_lora_rank
    return cache.latent[..., :c_dim], cache.latent[..., c_dim:], indexer, cache

  def _dense(self, q, k, v, layout: TokenLayout, options: AttentionOptions) -> tuple[jax.Array, jax.Array]:
    """Dense attention over every visible key (`flash_attention`: never a [T, S] mask or logits).

    `options.implementation` names the kernels' "xla" | "pallas" switch; dense attention's choices are "xla" |
    "cudnn", so "xla" is kept and anything else lets it pick (cuDNN on a GPU where it applies).
    """
    return flash_attention(q, k, v, q_positions=layout.q_positions, kv_positions=layout.kv_positions,
                           q_segment_ids=layout.q_segment_ids, kv_segment_ids=layout.kv_segment_ids,
                           scale=self.softmax_scale, implementation="xla" if options.implementation == "xla" else None)

  def _mha(self, q_nope, q_rope, c, k_rope, w_uk, w_uv, layout, options):
    k_nope = jnp.einsum("bsc,cnp->bsnp", c, w_uk)
    v = jnp.einsum("bsc,cnv->bsnv", c, w_uv)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + k_rope.shape[-1:])], -1)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    return self._dense(q, k, v, layout, options)

  def _mqa_operands(self, q_nope, q_rope, c, k_rope, w_uk) -> MQAOperands:
    q = jnp.concatenate([jnp.einsum("btnp,cnp->btnc", q_nope, w_uk), q_rope], axis=-1)  # [B, T, N, C + R]
    return MQAOperands(q=q, kv=jnp.concatenate([c, k_rope], axis=-1))  # kv [B, S, C + R]

  def _mqa(self, q_nope, q_rope, c, k_rope, w_uk, w_uv, layout, options, topk_indices):
    operands = self._mqa_operands(q_nope, q_rope, c, k_rope, w_uk)
    q, kv = operands.q, operands.kv
    c_dim = self.cfg.kv_lora_rank
    if options.kind == "sparse":
      out_latent, lse = sparse_mla_api.sparse_mla(q, kv, topk_indices, scale=self.softmax_scale, v_dim=c_dim,
                                                  implementation=options.implementation)
    else:
      out_latent, lse = self._dense(q, kv, c, layout, options)
    return jnp.einsum("btnc,cnv->btnv", out_latent, w_uv), lse, operands
