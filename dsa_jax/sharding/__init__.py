"""Sharding of the model over a device mesh: mesh config, the logical-axis table, expert and context
parallelism, multi-host setup."""

from dsa_jax import submodules

__getattr__ = submodules(__name__)  # dsa_jax.sharding.<module> after a plain `import dsa_jax`
