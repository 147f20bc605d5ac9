"""Indexer decode: scores of the decode rows over a paged FP8 / bf16 key cache, fused with top-k selection."""
