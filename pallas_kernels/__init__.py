"""GPU kernels for DeepSeek Sparse Attention, each beside the pure-jnp reference that is its spec.

Every kernel package holds a triplet (style.md, practice 7):
  reference.py  the spec in plain jnp; always available, the oracle of every test;
  <kernel>.py   the Pallas (Mosaic GPU) kernel;
  api.py        the public entry point with the `implementation=` switch ("xla" | "pallas" | None for
                automatic choice by backend) and the `custom_vjp` where training needs one.

This package imports nothing from `dsa_jax`.
"""
