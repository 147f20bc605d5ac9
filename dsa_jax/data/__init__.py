"""Data: tokenizers and input pipelines."""
