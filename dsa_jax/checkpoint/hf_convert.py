"""HuggingFace DeepSeek-V3.2 checkpoint <-> our parameter state, tensor by tensor.

Naming: HF `DeepseekV32ForCausalLM` / the official release (`model.layers.N.self_attn.q_a_proj.weight`,
`...mlp.experts.E.gate_proj.weight`, ...). HF linear weights are [out, in]; ours are [in, out] reshaped to
named axes (e.g. q_b_proj [N*H, Cq] -> wq_b [Cq, N, H]); per-expert matrices are stacked on an expert axis.
FP8 e4m3 weights come with a float32 `weight_scale_inv` per tile of `quantization_config.weight_block_size`;
the dequantised weight is fp8 value x its tile's scale (spec section 1).

Loading validates the whole key set and every shape from the headers first, then builds each target array
with `jax.make_array_from_callback`, which reads (memory-mapped) only what each device shard needs — the
671B checkpoint streams onto a mesh without being held in host memory.
"""

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax.checkpoint import CheckpointError, hf_config, hub, safetensors_io
from dsa_jax.data.tokenizer import ByteTokenizer, HFTokenizer, save_to_checkpoint
from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig

SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors dtype names
WEIGHT_DTYPES = SCALE_DTYPES + ("F8_E4M3", "F8_E5M2")  # the 8-bit ones need their `weight_scale_inv`
MAX_LISTED = 10  # problems listed in an error, then "... N more"

# Our path inside one block -> (HF name inside `model.layers.N.`, conversion kind).
BLOCK_KEYS = {
    "attn_norm.weight": ("input_layernorm.weight", "copy"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "copy"),
    "attn.wq_a": ("self_attn.q_a_proj.weight", "linear"),
    "attn.q_norm.weight": ("self_attn.q_a_layernorm.weight", "copy"),
    "attn.wq_b": ("self_attn.q_b_proj.weight", "linear"),
    "attn.wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", "linear"),
    "attn.kv_norm.weight": ("self_attn.kv_a_layernorm.weight", "copy"),
    "attn.wkv_b": ("self_attn.kv_b_proj.weight", "linear"),
    "attn.wo": ("self_attn.o_proj.weight", "linear"),
    "attn.indexer.wq_b": ("self_attn.indexer.wq_b.weight", "linear"),
    "attn.indexer.wk": ("self_attn.indexer.wk.weight", "linear"),
    "attn.indexer.k_norm.weight": ("self_attn.indexer.k_norm.weight", "copy"),
    "attn.indexer.k_norm.bias": ("self_attn.indexer.k_norm.bias", "copy"),
    "attn.indexer.weights_proj": ("self_attn.indexer.weights_proj.weight", "linear"),
    "ffn.gate": ("mlp.gate_proj.weight", "linear"),
    "ffn.up": ("mlp.up_proj.weight", "linear"),
    "ffn.down": ("mlp.down_proj.weight", "linear"),
    "ffn.router": ("mlp.gate.weight", "linear"),
    "ffn.bias": ("mlp.gate.e_score_correction_bias", "copy"),
    "ffn.w_gate": ("mlp.experts.{e}.gate_proj.weight", "experts"),
    "ffn.w_up": ("mlp.experts.{e}.up_proj.weight", "experts"),
    "ffn.w_down": ("mlp.experts.{e}.down_proj.weight", "experts"),
    "ffn.shared.gate": ("mlp.shared_experts.gate_proj.weight", "linear"),
    "ffn.shared.up": ("mlp.shared_experts.up_proj.weight", "linear"),
    "ffn.shared.down": ("mlp.shared_experts.down_proj.weight", "linear"),
}
TOP_KEYS = {
    "embed": ("model.embed_tokens.weight", "copy"),
    "norm.weight": ("model.norm.weight", "copy"),
    "lm_head": ("lm_head.weight", "linear"),
}
MTP_KEYS = {
    "mtp.enorm.weight": ("enorm.weight", "copy"),
    "mtp.hnorm.weight": ("hnorm.weight", "copy"),
    "mtp.eh_proj": ("eh_proj.weight", "linear"),
    "mtp.head_norm.weight": ("shared_head.norm.weight", "copy"),
}
# The MTP layer stores copies of the shared embedding and head; we keep one of each.
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclasses.dataclass(frozen=True)
class Mapping:
  """Where one of our state leaves lives in the HF checkpoint."""
  hf_key: str  # contains "{e}" for expert-stacked tensors
  kind: str  # "copy" | "linear" | "experts"
  num_experts: int = 0

  def hf_keys(self) -> list[str]:
    return [self.hf_key.format(e=e) for e in range(self.num_experts)] if self.kind == "experts" else [self.hf_key]


def _dotted(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def mapping(cfg: ModelConfig, path: tuple) -> Mapping:
  """HF location of the state leaf at `path` (e.g. ("layers", 3, "attn", "wq_b"))."""
  name = _dotted(path)
  experts = cfg.moe.num_experts
  if name in TOP_KEYS:
    return Mapping(*TOP_KEYS[name])
  if name in MTP_KEYS:
    key, kind = MTP_KEYS[name]
    return Mapping(f"model.layers.{cfg.num_layers}.{key}", kind)
  match = re.fullmatch(r"layers\.(\d+)\.(.+)", name) or re.fullmatch(r"mtp\.block\.()(.+)", name)
  if match and match.group(2) in BLOCK_KEYS:
    layer = match.group(1) or cfg.num_layers
    key, kind = BLOCK_KEYS[match.group(2)]
    return Mapping(f"model.layers.{layer}.{key}", kind, experts)
  raise KeyError(f"no HF mapping for state path {name!r}")


def _dequantize(ckpt: safetensors_io.SafetensorsDir, key: str, axes: list[np.ndarray], block: tuple[int, int],
                allow_non_finite: bool) -> np.ndarray:
  """The elements of tensor `key` at the outer product of `axes` as float32, each times the scale of its tile
  where the tensor has scales (`_validate` checked the tiling); reads only those elements and tiles."""
  value = ckpt.read(key, axes).astype(np.float32)
  if key + SCALE_SUFFIX in ckpt:
    tiles = [np.unique(a // b, return_inverse=True) for a, b in zip(axes, block)]
    scale = ckpt.read(key + SCALE_SUFFIX, [t for t, _ in tiles]).astype(np.float32)
    value = value * scale[np.ix_(*(where for _, where in tiles))]
  bad = value.size - np.count_nonzero(np.isfinite(value))
  if bad and not allow_non_finite:
    part = "" if value.size == np.prod(ckpt.shape(key)) else " in one device's slice"
    raise CheckpointError(f"{ckpt.file(key)}: tensor {key!r} has {bad} non-finite values (NaN or Inf) of "
                          f"{value.size}{part}; pass allow_non_finite=True to load it as it is.")
  return value


def _flat(axes: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
  """Row-major positions, within `shape` flattened, of the outer product of `axes` (ascending like them)."""
  return np.ravel_multi_index(np.ix_(*axes), shape).ravel()


def _reader(ckpt, m: Mapping, shape: tuple[int, ...], in_dims: int, block,
            allow_non_finite) -> Callable[[tuple], np.ndarray]:
  """A callback index -> the slice of our leaf, reading only the HF elements (and scale tiles) that slice holds."""
  def read(index: tuple) -> np.ndarray:
    axes = [np.arange(n)[i] for n, i in zip(shape, index)]
    if m.kind == "copy":
      return _dequantize(ckpt, m.hf_key, axes, block, allow_non_finite)
    if m.kind == "experts":  # ours [E, in, out], HF's [out, in] per expert
      return np.stack([_dequantize(ckpt, m.hf_key.format(e=e), axes[:0:-1], block, allow_non_finite).T
                       for e in axes[0]])
    rows, cols = _flat(axes[in_dims:], shape[in_dims:]), _flat(axes[:in_dims], shape[:in_dims])
    return _dequantize(ckpt, m.hf_key, [rows, cols], block, allow_non_finite).T.reshape([a.size for a in axes])
  return read


def _hf_shape(m: Mapping, shape: tuple[int, ...], in_dims: int) -> tuple[int, ...]:
  """The HF tensor shape of a leaf of `shape`: [out, in] for linears, where `in` spans `in_dims` leading dims."""
  if m.kind == "copy":
    return shape
  if m.kind == "experts":
    return (shape[2], shape[1])
  return (int(np.prod(shape[in_dims:])), int(np.prod(shape[:in_dims])))


IN_DIMS = {"wo": 2}  # wo [N, V, D]: the input spans heads x head_dim


def _tensor_problem(ckpt, key: str, want: tuple[int, ...], block: tuple[int, int]) -> str | None:
  """What is wrong with tensor `key` as the HF form (shape `want`) of one of our leaves, if anything."""
  if key not in ckpt:
    return f"missing: {key} (shape {list(want)})"
  shape, dtype, scale = ckpt.shape(key), ckpt.dtype(key), key + SCALE_SUFFIX
  if shape != want:
    return f"wrong shape: {key} is {list(shape)}, expected {list(want)}"
  if dtype not in WEIGHT_DTYPES:
    return f"wrong dtype: {key} is {dtype} in {ckpt.file(key).name}; allowed: {', '.join(WEIGHT_DTYPES)}"
  if scale not in ckpt:
    return f"no scale: {key} is {dtype} but {scale} is missing" if dtype.startswith("F8") else None
  tiles = [-(-n // b) for n, b in zip(shape, block)]
  if len(shape) != 2 or list(ckpt.shape(scale)) != tiles:
    return (f"wrong scale shape: {scale} is {list(ckpt.shape(scale))}, expected {tiles} (weight {list(shape)} in "
            f"tiles of quantization_config.weight_block_size {list(block)})")
  if ckpt.dtype(scale) not in SCALE_DTYPES:
    return f"wrong dtype: {scale} is {ckpt.dtype(scale)}; allowed: {', '.join(SCALE_DTYPES)}"
  return None


def _check_extent(ckpt, cfg: ModelConfig) -> None:
  """Fails at once where config.json asks for more layers or experts than the checkpoint holds, before the work
  that grows with the config's sizes (the abstract state, the expected key set)."""
  last = cfg.num_layers - 1
  paths = [("layers", last, "attn_norm", "weight")] + [("layers", last, "ffn", "w_down")] * cfg.is_moe_layer(last)
  for path in paths:
    m = mapping(cfg, path)
    key = m.hf_key.format(e=m.num_experts - 1)
    if key not in ckpt:
      raise CheckpointError(f"{ckpt.path}: config.json has {cfg.num_layers} layers and {cfg.moe.num_experts} "
                            f"experts, but the checkpoint has no {key}; allowed: a config.json of these weights.")


def _validate(ckpt, cfg: ModelConfig, leaves: dict, include_mtp: bool, block: tuple[int, int]) -> None:
  problems, expected = [], set()
  for path, leaf in leaves.items():
    m = mapping(cfg, path)
    want = _hf_shape(m, leaf.shape, IN_DIMS.get(str(path[-1]), 1))
    for key in m.hf_keys():
      expected.add(key)
      if problem := _tensor_problem(ckpt, key, want, block):
        problems.append(problem)
  mtp_prefix = f"model.layers.{cfg.num_layers}."
  for key in ckpt.keys():
    base = key[:-len(SCALE_SUFFIX)] if key.endswith(SCALE_SUFFIX) else key
    if base in expected or (key.startswith(mtp_prefix) and
                            (not include_mtp or key[len(mtp_prefix):] in MTP_SHARED_COPIES)):
      continue
    problems.append(f"unknown: {key}")
  if problems:
    more = f"; ... {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise CheckpointError(f"{ckpt.path}: checkpoint does not match config.json ({len(problems)} problems): "
                          + "; ".join(problems[:MAX_LISTED]) + more)


def load_hf(path: str | pathlib.Path, dtype=jnp.float32, *, include_mtp: bool | None = None,
            shardings: Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
            allow_non_finite: bool = False):
  """Loads an HF DeepSeek-V3.2 checkpoint -> (ModelConfig, state).

  path: a directory, or a hub id ("deepseek-ai/DeepSeek-V3.2") read through the HF cache (`hub.local_dir`).
  dtype: parameter and compute dtype (router and indexer weights_proj stay float32).
  include_mtp: load the MTP layer (default: when the config has one). shardings(path, leaf) gives each
  leaf's target sharding (default: the first device).
  allow_non_finite: load weights holding NaN or Inf (by default the first such tensor raises).
  The directory is untrusted input: config.json, the index and every header are checked, then the key set, each
  tensor's shape, dtype and FP8 tiling, all before any tensor is read; errors are one-line `CheckpointError`s.
  """
  path = hub.local_dir(path)
  cfg = hf_config.read_config(path, jnp.dtype(dtype).name)
  block = hf_config.read_block_size(path)
  include_mtp = cfg.num_mtp_layers > 0 if include_mtp is None else include_mtp
  cfg = cfg.replace(num_mtp_layers=int(include_mtp))
  ckpt = safetensors_io.SafetensorsDir(path)
  _check_extent(ckpt, cfg)
  abstract = functional.abstract_state(cfg)
  leaves = {p: v for p, v in nnx.to_flat_state(abstract)}
  _validate(ckpt, cfg, {p: v.get_value() for p, v in leaves.items()}, include_mtp, block)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for p, var in leaves.items():
    leaf = var.get_value()
    sharding = shardings(p, leaf) if shardings else default
    read = _reader(ckpt, mapping(cfg, p), leaf.shape, IN_DIMS.get(str(p[-1]), 1), block, allow_non_finite)
    var.set_value(jax.make_array_from_callback(leaf.shape, sharding,
                                               lambda idx, read=read, dt=leaf.dtype: read(idx).astype(dt)))
  return cfg, nnx.from_flat_state([(p, v) for p, v in leaves.items()])


def hf_tensors(cfg: ModelConfig, state: nnx.State, dtype=np.float32) -> dict[str, np.ndarray]:
  """Our state -> {HF key: numpy array [out, in]} (the inverse of load_hf's mapping)."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    m = mapping(cfg, path)
    value = np.asarray(jax.device_get(var.get_value()), np.float32)
    if m.kind == "experts":
      for e in range(m.num_experts):
        out[m.hf_key.format(e=e)] = value[e].T.astype(dtype)
    elif m.kind == "linear":
      in_dims = IN_DIMS.get(str(path[-1]), 1)
      out[m.hf_key] = value.reshape(int(np.prod(value.shape[:in_dims])), -1).T.astype(dtype)
    else:
      out[m.hf_key] = value.astype(dtype)
  if cfg.num_mtp_layers:
    prefix = f"model.layers.{cfg.num_layers}."
    out[prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
    out[prefix + "shared_head.head.weight"] = out["lm_head.weight"]
  return out


def save_hf(path: str | pathlib.Path, cfg: ModelConfig, state: nnx.State, *, dtype=np.float32,
            max_shard_bytes: int = 4 << 30, tokenizer: ByteTokenizer | HFTokenizer | None = None) -> None:
  """Writes config.json, safetensors shards and model.safetensors.index.json (unquantised), and with
  `tokenizer` its tokenizer.json and tokenizer_config.json (`dsa_jax.data.tokenizer.from_checkpoint`)."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = hf_tensors(cfg, state, dtype)
  shards, current, size = [], {}, 0
  for key in sorted(tensors):
    if current and size + tensors[key].nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = tensors[key]
    size += tensors[key].nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors_io.write_file(path / name, shard)
    weight_map.update({key: name for key in shard})
  (path / safetensors_io.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
  hf = hf_config.config_to_hf(cfg)
  hf["torch_dtype"] = np.dtype(dtype).name
  (path / "config.json").write_text(json.dumps(hf, indent=1))
  if tokenizer is not None:
    save_to_checkpoint(path, tokenizer)
