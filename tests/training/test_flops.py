"""Model FLOPs per token of each stage against hand-computed numbers on a small config."""

import pytest

from dsa_jax.model import config
from dsa_jax.training import flops

# D 4, V 10; MLA N 2, q rank 3, C 4, P 2, R 2, Vh 3; indexer I 2, H 4, top-3; layer 0 dense (hidden 6),
# layer 1 MoE (4 experts of hidden 5, top-2, one shared).
CFG = config.ModelConfig(
    vocab_size=10, hidden_size=4, num_layers=2, first_k_dense=1, dense_hidden=6, num_mtp_layers=0,
    mla=config.MLAConfig(num_heads=2, q_lora_rank=3, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
                         v_head_dim=3),
    indexer=config.IndexerConfig(num_heads=2, head_dim=4, topk=3),
    moe=config.MoEConfig(num_experts=4, experts_per_token=2, num_shared_experts=1, expert_hidden=5, num_groups=2,
                         topk_groups=1))
# Matmul parameters per token. MLA: wq_a 4x3 + wq_b 3x2x4 + wkv_a 4x6 + wkv_b 4x2x5 + wo 2x3x4 = 124 a layer;
# dense MLP 3 x 4x6 = 72; MoE: router 4x4 + experts 3 x 4x4x5 x 2/4 + shared 3 x 4x5 = 196; LM head 4x10 = 40.
W = 2 * (2 * 124 + 72 + 196 + 40)  # 1112
WI = 2 * 2 * (3 * 2 * 4 + 4 * 4 + 4 * 2)  # indexer wq_b, wk, weights_proj in both layers: 192
T, S, KS = 8, 4.5, 21 / 8  # S = (1 + ... + 8) / 8; Ks = (1 + 2 + 3 + 3 x 5) / 8
A_MHA, A_MQA, X, G = 2 * 2 * (2 + 2 + 3), 2 * 2 * (4 + 2 + 4), 2 * 2 * (4 + 1), 2  # 28, 40, 20, 2


def test_key_counts_are_exact_sums_over_the_row():
  assert flops.mean_causal_keys(T) == sum(t + 1 for t in range(T)) / T == S
  assert flops.mean_selected_keys(T, 3) == sum(min(3, t + 1) for t in range(T)) / T == KS
  assert flops.mean_selected_keys(T, 100) == S  # top-k longer than the row: every causal key
  assert flops.param_flops(CFG, with_mtp=False) == (W, WI)


@pytest.mark.parametrize("stage, want", [
    ("dense", 3 * (W + 2 * A_MHA * S)),  # 4092
    ("warmup", W + 2 * A_MHA * S + 3 * WI + 2 * (G * S + 3 * X * S)),  # 2498: attends in MHA mode
    ("sparse", 3 * (W + 2 * A_MQA * KS) + 3 * WI + 2 * (X * S + G * KS + 2 * X * KS)),  # 4942.5
])
def test_stage_flops_per_token(stage, want):
  assert flops.per_token(CFG, T, stage, with_mtp=False) == pytest.approx(want)
  assert {"dense": 4092, "warmup": 2498, "sparse": 4942.5}[stage] == pytest.approx(want)


def test_mtp_adds_its_block_and_a_second_use_of_the_lm_head():
  cfg = CFG.replace(num_mtp_layers=1)
  # MTP: eh_proj 8x4 + MLA 124 + MoE 196 (its block is a MoE layer), its indexer 48; the LM head once more.
  w = W + 2 * (32 + 124 + 196) + 2 * 40
  assert flops.per_token(cfg, T, "dense", with_mtp=True) == pytest.approx(3 * (w + 3 * A_MHA * S))  # 6822
  assert flops.per_token(cfg, T, "dense", with_mtp=False) == pytest.approx(4092)
