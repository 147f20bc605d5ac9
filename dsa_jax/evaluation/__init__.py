"""Evaluations of a trained model that are more than a training-time metric: `long_context` (a RULER-style
retrieval grid, a top-k sweep for DSA models, held-out loss with its interval and by position)."""
