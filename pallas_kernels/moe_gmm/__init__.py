"""Grouped matrix multiplication for routed MoE experts (rows sorted by expert)."""
