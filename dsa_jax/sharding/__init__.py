"""Sharding of the model over a device mesh: mesh config, the logical-axis table, expert and context
parallelism, multi-host setup."""
