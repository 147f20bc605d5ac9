"""Timing helpers and baselines (XLA matmul, cuDNN dense attention, lax.top_k) for the kernel benchmarks."""
