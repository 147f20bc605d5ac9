"""Evaluations of a trained model that are more than a training-time metric: `long_context` (a RULER-style
retrieval grid, a top-k sweep for DSA models, held-out loss with its interval and by position)."""

from dsa_jax import submodules

__getattr__ = submodules(__name__)  # dsa_jax.evaluation.<module> after a plain `import dsa_jax`
