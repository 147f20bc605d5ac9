"""Indexer KL losses of DeepSeek-V3.2 continued pre-training (dense warm-up and sparse stage)."""
