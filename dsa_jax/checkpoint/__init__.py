"""Checkpoint formats: HuggingFace safetensors import/export (Orbax state checkpoints live in training)."""
