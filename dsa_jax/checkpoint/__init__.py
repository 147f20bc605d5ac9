"""Checkpoint formats: HuggingFace safetensors import/export (Orbax state checkpoints live in training)."""


class CheckpointError(ValueError):
  """A checkpoint file (config.json, index or safetensors) that cannot be loaded as it is: the message names the
  file, the tensor or field, the value and what is allowed."""
