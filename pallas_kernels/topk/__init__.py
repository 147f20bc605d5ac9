"""Exact top-k key selection per query row for DeepSeek Sparse Attention."""
