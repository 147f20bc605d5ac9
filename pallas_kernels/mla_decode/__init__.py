"""MLA decode over a paged latent cache (FP8 or bf16): sparse (selected rows) and dense (every visible row)."""
