"""Sampling: batched generation through the latent KV and indexer caches (DeepSeek-V3.2 §3.1 needs), continuous
batching over the paged cache (`batcher`) and decoding with MTP drafts (`speculative`)."""

from dsa_jax import submodules
from dsa_jax.sampling import speculative
from dsa_jax.sampling.batcher import BatcherConfig, Completion, generate_continuous
from dsa_jax.sampling.sampler import SampleOutput, SamplingConfig, full_tokens, generate, left_pad, train_layout

__all__ = ["BatcherConfig", "Completion", "SampleOutput", "SamplingConfig", "full_tokens", "generate",
           "generate_continuous", "left_pad", "speculative", "train_layout"]

__getattr__ = submodules(__name__)  # dsa_jax.sampling.<module> after a plain `import dsa_jax`
