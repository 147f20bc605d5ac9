"""Sampling: batched generation through the latent KV and indexer caches (DeepSeek-V3.2 §3.1 needs), and
decoding with MTP drafts (`speculative`)."""

from dsa_jax.sampling import speculative
from dsa_jax.sampling.sampler import SampleOutput, SamplingConfig, full_tokens, generate, left_pad, train_layout

__all__ = ["SampleOutput", "SamplingConfig", "full_tokens", "generate", "left_pad", "speculative", "train_layout"]
