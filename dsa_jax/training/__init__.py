"""Continued pre-training with DeepSeek Sparse Attention (spec section 2): state, optimizer, losses,
MoE balance, the train step, checkpoints and the loop."""

from dsa_jax import submodules

__getattr__ = submodules(__name__)  # dsa_jax.training.<module> after a plain `import dsa_jax`
