"""Continued pre-training with DeepSeek Sparse Attention (spec section 2): state, optimizer, losses,
MoE balance, the train step, checkpoints and the loop."""
