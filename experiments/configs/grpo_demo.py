"""The tiny MoE DSA model of the GRPO demonstrations (`experiments.train_grpo`, `experiments.grpo_mismatch`,
notebook 04): the `tiny` preset without MTP, 3 layers (2 MoE, 8 experts, 2 active) and an indexer of 4 heads
whose top-k makes DSA sparse from token k + 1 on (`train_grpo` uses 8: every completion token of "sort:ddd=",
9 prompt tokens)."""

from dsa_jax.model.config import IndexerConfig, ModelConfig, tiny


def model_config(vocab_size: int, index_topk: int = 4) -> ModelConfig:
  indexer = IndexerConfig(num_heads=4, head_dim=16, topk=index_topk)
  return tiny().replace(vocab_size=vocab_size, num_mtp_layers=0, indexer=indexer)
