"""Data: tokenizers and input pipelines."""

from dsa_jax import submodules

__getattr__ = submodules(__name__)  # dsa_jax.data.<module> after a plain `import dsa_jax`
