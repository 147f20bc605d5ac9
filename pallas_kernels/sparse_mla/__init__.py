"""Sparse MLA attention over gathered latent entries (DeepSeek-V3.2 DSA in MQA mode)."""
