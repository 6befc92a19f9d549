"""Softmax cross-entropy and top-1 accuracy for integer class labels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example CE of integer `labels` [B] under `logits` [B, C], with optional label smoothing."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example top-1 correctness as float32 [B]."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
