"""Pure loss functions: per-example values, no reduction, no model code.

  classification  softmax cross-entropy and accuracy (supervised, transfer, fine-tuning)
  likelihood      the error functions of regression, binary/multi-label and multiclass tasks
  contrastive     InfoNCE, NT-Xent, SupCon, CLIP, SigLIP (and its chunked form)
"""
from jtl.losses import contrastive, likelihood
from jtl.losses.classification import accuracy, softmax_cross_entropy

__all__ = ["accuracy", "contrastive", "likelihood", "softmax_cross_entropy"]
