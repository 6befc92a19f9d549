"""Multitask learning: task heads and losses, sharing architectures, loss weighting and gradient
aggregation (gradient manipulation from the T x T Gram matrix of per-task gradients)."""
