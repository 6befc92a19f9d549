"""Pure loss functions: per-example values, no reduction, no model code.

  classification  softmax cross-entropy and accuracy (supervised, transfer, fine-tuning)
"""
from jtl.losses.classification import accuracy, softmax_cross_entropy

__all__ = ["accuracy", "softmax_cross_entropy"]
