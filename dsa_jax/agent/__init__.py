"""Agent side of DeepSeek-V3.2 (spec §4): chat and tool format, tool registry, rollouts, context management.

`sampler_adapter` drives rollouts with the model's sampler; every other module imports without JAX.
"""
