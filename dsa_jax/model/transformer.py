"""The DeepSeek-V3.2 transformer: embedding, decoder blocks, final norm, LM head, and the MTP module.

Official `Transformer` / HF `DeepseekV32ForCausalLM`. Block i: x += MLA(RMSNorm(x)); x += FFN(RMSNorm(x)),
with a dense SwiGLU FFN for the first `first_k_dense` blocks and DeepSeekMoE after.
MTP (DeepSeek-V3 paper section 2.2, depth 1, checkpoint layer 61): h' = eh_proj([enorm(Emb(t_{i+1})) ;
hnorm(h_i)]), one more block, shared_head norm, and the shared LM head: position i predicts token i+2.

Rematerialisation (`remat`, for training at long context): "layer" wraps each decoder layer (and the MTP
block) in `jax.checkpoint` keeping only its inputs, its top-k selection and the outputs of its chunked parts
(`layers.CHUNKED_OUTPUT`: their chunks rematerialise themselves), so the backward pass recomputes one layer
at a time (one more forward pass of the layers' unchunked parts); "layer_save_dots" also keeps the outputs of
the matmuls without batch dimensions (the projections) and recomputes the rest (attention, elementwise work).
`with_logits=False` returns the LM head's input and weights instead of [B, T, V] logits, for a loss that
never materialises them (`dsa_jax.training.losses.chunked_cross_entropy`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax.model import paged_cache, rope
from dsa_jax.model.config import ModelConfig
from dsa_jax.model.kv_cache import KVCache, LayerCache
from dsa_jax.model.paged_cache import PagedKVCache, PagedLayer
from dsa_jax.model.layers import ATTENTION_LSE, CHUNKED_OUTPUT, MLP, TOPK_INDICES, RMSNorm, constrain, param
from dsa_jax.model.mla import MLA, AttentionAux, AttentionOptions, TokenLayout
from dsa_jax.model.moe import ExpertDispatch, MoE, MoEAux
from dsa_jax.validation import check_int_range

INIT_STD = 0.02
ACT_BTD = ("act_batch", "act_length", "act_embed")  # logical axes of the residual stream (sharding hints)
_KEPT = jax.checkpoint_policies.save_only_these_names(CHUNKED_OUTPUT, TOPK_INDICES, ATTENTION_LSE)
REMAT_POLICIES = {"none": None, "layer": _KEPT, "layer_save_dots": jax.checkpoint_policies.save_from_both_policies(
    _KEPT, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)}


@dataclasses.dataclass(frozen=True)
class LayerAux:
  """One decoder layer's (or the MTP block's) intermediates that training and sampling read."""
  attention: AttentionAux
  moe: MoEAux | None = None  # MoE layers only


jax.tree_util.register_dataclass(LayerAux, data_fields=["attention", "moe"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ModelOutput:
  """Logits and per-layer intermediates of one forward pass."""
  logits: jax.Array | None  # [B, T, V] float32; None with with_logits=False
  hidden_states: tuple[jax.Array, ...]  # per layer [B, T, D], before the final norm
  layer_aux: tuple[LayerAux, ...]  # per decoder layer
  mtp_logits: jax.Array | None = None  # [B, T, V]: position i predicts token i + 2
  cache: KVCache | PagedKVCache | None = None  # the updated decode cache when one was passed in
  mtp_aux: LayerAux | None = None  # the MTP block's (like a layer's): its indexer's KL and its router's load
  # with_logits=False: the LM head's input (final norm output) [B, T, D], the MTP block's, and the head [D, V],
  # all in the compute dtype: logits = head_input @ lm_head.
  head_input: jax.Array | None = None
  mtp_head_input: jax.Array | None = None
  lm_head: jax.Array | None = None


jax.tree_util.register_dataclass(
    ModelOutput, data_fields=["logits", "hidden_states", "layer_aux", "mtp_logits", "cache", "mtp_aux", "head_input",
                              "mtp_head_input", "lm_head"], meta_fields=[])


def check_inputs(cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array | None = None,
                 next_ids: jax.Array | None = None, *,
                 names: tuple[str, str, str] = ("input_ids", "positions", "next_ids")) -> None:
  """Raises ValueError on inputs the model would read wrong without a word: an empty batch or sequence,
  more than `max_position` tokens, ids outside the vocabulary (a gather clamps them) and positions beyond
  `max_position`. Shapes are checked always; values only when concrete (`validation.is_concrete`: not
  inside jit), with one min and one max per array. `names` name the three arrays in the message."""
  shape = tuple(input_ids.shape)
  if len(shape) != 2 or shape[0] < 1 or not 1 <= shape[1] <= cfg.max_position:
    raise ValueError(f"{names[0]} has shape {shape}; allowed: [B, T] with B >= 1 and 1 <= T <= max_position="
                     f"{cfg.max_position}.")
  for name, ids in ((names[0], input_ids), (names[2], next_ids)):
    if ids is not None:
      check_int_range(name, ids, 0, cfg.vocab_size, "vocabulary")
  if positions is not None:
    check_int_range(names[1], positions, 0, cfg.max_position,
                    f"positions of ModelConfig.max_position={cfg.max_position}")


def _remat(call, remat: str):
  """`call(module, *arrays)` under the rematerialisation policy `remat` (the call itself for "none")."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is invalid; allowed: {tuple(REMAT_POLICIES)}.")
  return call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat])


class Block(nnx.Module):
  """One decoder layer."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, indexer_fp8: bool = False):
    d, pdt = cfg.hidden_size, cfg.param_dtype
    self.attn_norm = RMSNorm(d, "embed", eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.attn = MLA(cfg.mla, cfg.indexer, hidden=d, softmax_scale=cfg.softmax_scale, rngs=rngs, dtype=cfg.dtype,
                    param_dtype=pdt, std=INIT_STD, indexer_fp8=indexer_fp8)
    self.ffn_norm = RMSNorm(d, "embed", eps=cfg.rms_norm_eps, param_dtype=pdt)
    if cfg.is_moe_layer(layer):
      self.ffn = MoE(cfg.moe, hidden=d, rngs=rngs, dtype=cfg.dtype, param_dtype=pdt, std=INIT_STD)
    else:
      self.ffn = MLP(d, cfg.dense_hidden, rngs=rngs, dtype=cfg.dtype, param_dtype=pdt, std=INIT_STD)

  def __call__(self, x: jax.Array, layout: TokenLayout, options: AttentionOptions,
               forced_experts: jax.Array | None = None, cache: LayerCache | PagedLayer | None = None,
               expert_dispatch: ExpertDispatch | None = None) -> tuple[jax.Array, LayerAux]:
    attn_out, attn_aux = self.attn(self.attn_norm(x), layout, options, cache)
    x = x + attn_out.astype(x.dtype)
    moe_aux = None
    if isinstance(self.ffn, MoE):
      ffn_out, moe_aux = self.ffn(self.ffn_norm(x), forced_experts, implementation=options.implementation,
                                  dispatch=expert_dispatch)
    else:
      ffn_out = self.ffn(self.ffn_norm(x))
    return constrain(x + ffn_out.astype(x.dtype), ACT_BTD), LayerAux(attn_aux, moe_aux)


class MTP(nnx.Module):
  """Multi-token prediction module of depth 1 (checkpoint `model.layers.{num_layers}`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, indexer_fp8: bool = False):
    d, pdt = cfg.hidden_size, cfg.param_dtype
    self.enorm = RMSNorm(d, "embed", eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.hnorm = RMSNorm(d, "embed", eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.eh_proj = param(rngs, (2 * d, d), ("embed2", "embed"), pdt, INIT_STD)
    self.block = Block(cfg, cfg.num_layers, rngs=rngs, indexer_fp8=indexer_fp8)
    self.head_norm = RMSNorm(d, "embed", eps=cfg.rms_norm_eps, param_dtype=pdt)  # shared_head.norm
    self.dtype = cfg.dtype

  def __call__(self, hidden: jax.Array, next_embeds: jax.Array, layout: TokenLayout, options: AttentionOptions,
               expert_dispatch: ExpertDispatch | None = None,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerAux]:
    """-> (the head's input [B, T, D], aux). `cache`: the block's own decode cache (speculative decoding), as a
    decoder layer's; the updated cache comes back in aux.attention.cache."""
    joined = jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1).astype(self.dtype)
    joined = constrain(joined, ACT_BTD)  # [B, T, 2D] sharded as the residual stream (else GSPMD replicates it)
    x = constrain(jnp.einsum("bte,ed->btd", joined, self.eh_proj[...].astype(self.dtype)), ACT_BTD)
    x, aux = self.block(x, layout, options, cache=cache, expert_dispatch=expert_dispatch)
    return self.head_norm(x), aux


class DeepseekV32(nnx.Module):
  """The causal LM. Call it on token ids; see `dsa_jax.model.functional` for the pure-function form."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, indexer_fp8: bool = False):
    d, pdt = cfg.hidden_size, cfg.param_dtype
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), pdt, INIT_STD)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, indexer_fp8=indexer_fp8) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(d, "embed", eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), pdt, INIT_STD)
    self.mtp = MTP(cfg, rngs=rngs, indexer_fp8=indexer_fp8) if cfg.num_mtp_layers else None

  def layout(self, positions: jax.Array, segment_ids: jax.Array) -> TokenLayout:
    cos, sin = rope.rope_tables(self.cfg.rope, self.cfg.mla.qk_rope_head_dim, positions)
    kv_axes = ("act_batch", "act_kv_length")  # keys are gathered over the context shards; queries stay local
    return TokenLayout(positions, constrain(positions, kv_axes), segment_ids, constrain(segment_ids, kv_axes), cos,
                       sin)

  def head_weight(self) -> jax.Array:
    return self.lm_head[...].astype(self.cfg.dtype)

  def logits(self, normed: jax.Array) -> jax.Array:
    return jnp.einsum("btd,dv->btv", normed.astype(self.cfg.dtype), self.head_weight(),
                      preferred_element_type=jnp.float32)

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, options: AttentionOptions = AttentionOptions(),
               forced_experts: dict[int, jax.Array] | None = None, with_mtp: bool = False,
               cache: KVCache | PagedKVCache | None = None, expert_dispatch: ExpertDispatch | None = None,
               next_ids: jax.Array | None = None, remat: str = "none", with_logits: bool = True) -> ModelOutput:
    """input_ids [B, T] -> ModelOutput. forced_experts maps a MoE layer index to its [B, T, k] choices.

    With `cache` the T tokens are appended to it (prefill or one decode step) and attend to everything
    cached; the updated cache comes back in ModelOutput.cache (`kv_cache`). A `PagedKVCache` (`paged_cache`)
    needs `positions`: the logical position of each token in its sequence, where it is written and up to which
    it attends; segment ids are unused (one sequence per batch row).
    expert_dispatch replaces the single-device expert computation (`dsa_jax.sharding.expert_parallel`).
    next_ids [B, T]: the token after each position in document order, the MTP block's input (default: the
    ids shifted along the array, wrong once the sequence is permuted for context parallelism).
    remat: the layers' rematerialisation policy (`REMAT_POLICIES`); with_logits=False: see the module docstring.
    Bad inputs raise ValueError (`check_inputs`; values are checked only outside jit).
    """
    check_inputs(self.cfg, input_ids, positions, next_ids)
    if isinstance(cache, PagedKVCache):
      if positions is None:
        raise ValueError("a PagedKVCache needs positions; allowed: positions [B, T], each token's position in its "
                         "sequence.")
      paged_cache.check_positions(cache, positions)
    b, t = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
    segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    layout = self.layout(positions, segment_ids)
    if isinstance(cache, KVCache):
      cache = cache.with_keys(positions, segment_ids)
      layout = dataclasses.replace(layout, kv_positions=cache.positions, kv_segment_ids=cache.segment_ids)
    # The table is gathered whole before the lookup (ZeRO-3: weights are all-gathered before use), so the rows
    # come out sharded as the ids are; a lookup into the sharded table makes GSPMD replicate its output.
    table = constrain(self.embed[...].astype(self.cfg.dtype), (None, None))
    x = constrain(table[input_ids], ACT_BTD)
    hidden, aux = [], []
    forced_experts = forced_experts or {}
    run_block = _remat(lambda block, x, layout, forced, layer_cache: block(x, layout, options, forced, layer_cache,
                                                                            expert_dispatch), remat)
    for i, block in enumerate(self.layers):
      x, layer_aux = run_block(block, x, layout, forced_experts.get(i), None if cache is None else cache.layer(i))
      hidden.append(x)
      aux.append(layer_aux)
    if cache is not None:
      cache = cache.with_layers(tuple(a.attention.cache for a in aux))
    mtp_hidden = mtp_aux = None
    if with_mtp:
      if self.mtp is None:
        raise ValueError("with_mtp=True needs num_mtp_layers=1; this config has num_mtp_layers=0.")
      if next_ids is None:
        next_ids = jnp.concatenate([input_ids[:, 1:], input_ids[:, -1:]], axis=1)
      run_mtp = _remat(lambda mtp, x, next_embeds, layout: mtp(x, next_embeds, layout, options, expert_dispatch),
                       remat)
      mtp_hidden, mtp_aux = run_mtp(self.mtp, x, table[next_ids], layout)
    normed = self.norm(x)
    if not with_logits:
      dt = self.cfg.dtype
      return ModelOutput(None, tuple(hidden), tuple(aux), None, cache, mtp_aux, normed.astype(dt),
                         None if mtp_hidden is None else mtp_hidden.astype(dt), self.head_weight())
    mtp_logits = None if mtp_hidden is None else self.logits(mtp_hidden)
    return ModelOutput(self.logits(normed), tuple(hidden), tuple(aux), mtp_logits, cache, mtp_aux)
