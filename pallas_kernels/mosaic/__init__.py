"""Mosaic GPU building blocks shared by the kernels: row gathers by cp.async and per-row TMA copies."""
