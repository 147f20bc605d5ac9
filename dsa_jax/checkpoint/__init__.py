"""Checkpoint formats: HuggingFace safetensors import/export (Orbax state checkpoints live in training)."""

from dsa_jax import submodules
from dsa_jax.validation import UserError


class CheckpointError(UserError):
  """A checkpoint file (config.json, index or safetensors) that cannot be loaded as it is: the message names the
  file, the tensor or field, the value and what is allowed (a UserError: the commands print it as one line)."""

__getattr__ = submodules(__name__)  # dsa_jax.checkpoint.<module> after a plain `import dsa_jax`
