"""DeepSeek-V3.2 model: config, MLA + lightning indexer + DSA, DeepSeekMoE, MTP (Flax NNX)."""
