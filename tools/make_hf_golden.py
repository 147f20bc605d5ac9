"""Makes a golden fixture from HuggingFace's DeepseekV32ForCausalLM for a config unlike the shared one.

Developer tool, not run by the suite (it needs torch and transformers==5.24.0, which the project does not
depend on):  python tools/make_hf_golden.py OUT_DIR [--seed N]
Writes config.json, model.safetensors and golden.npz (input_ids, logits, hidden_layer{i},
topk_indices_layer{i}) in the layout of tests/fixtures/hf_deepseek_v32_tiny. Unlike that fixture, every
norm weight, LayerNorm bias and e_score_correction_bias is random, YaRN has mscale != mscale_all_dim, top-k
weights are not normalised and the first layer is already MoE.
"""

import argparse
import pathlib

import numpy as np
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

CONFIG = dict(
    vocab_size=300, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=3, num_key_value_heads=3, n_shared_experts=2, n_routed_experts=6, routed_scaling_factor=1.5,
    kv_lora_rank=12, q_lora_rank=20, qk_rope_head_dim=4, v_head_dim=10, qk_nope_head_dim=8, n_group=3, topk_group=2,
    num_experts_per_tok=3, first_k_dense_replace=0, norm_topk_prob=False, index_n_heads=8, index_head_dim=16,
    index_topk=5, max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=8.0, original_max_position_embeddings=8,
                         beta_fast=16.0, beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out", type=pathlib.Path)
  parser.add_argument("--seed", type=int, default=5)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  cfg = DeepseekV32Config(**CONFIG)
  cfg._attn_implementation = "eager"
  model = DeepseekV32ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("k_norm.bias"):
        p.copy_(0.2 * torch.randn_like(p))
    for layer in model.model.layers:
      if hasattr(layer.mlp, "gate"):
        layer.mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(cfg.n_routed_experts))
  hidden, topk = {}, {}
  for i, layer in enumerate(model.model.layers):
    layer.register_forward_hook(lambda m, a, out, i=i: hidden.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    layer.self_attn.indexer.register_forward_hook(lambda m, a, out, i=i: topk.__setitem__(i, out))
  ids = torch.randint(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    logits = model(ids).logits
  golden = {"input_ids": ids.numpy().astype(np.int32), "logits": logits.numpy()}
  positions = np.arange(ids.shape[1])[None, :, None]
  for i in hidden:
    golden[f"hidden_layer{i}"] = hidden[i].numpy()
    idx = topk[i].numpy().astype(np.int64)
    idx = np.where(idx <= positions, idx, ids.shape[1])
    idx = np.sort(idx, axis=-1)
    golden[f"topk_indices_layer{i}"] = np.where(idx == ids.shape[1], -1, idx).astype(np.int32)
  args.out.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(args.out, safe_serialization=True)
  np.savez(args.out / "golden.npz", **golden)
  print("wrote", args.out, sorted(golden))


if __name__ == "__main__":
  main()
