"""Agent side of DeepSeek-V3.2 (spec §4): chat and tool format, tool registry, rollouts, context management.

`sampler_adapter` drives rollouts with the model's sampler; every other module imports without JAX.
"""

from dsa_jax import submodules

__getattr__ = submodules(__name__)  # dsa_jax.agent.<module> after a plain `import dsa_jax`
