"""Knowledge distillation: the soft-target loss of Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network".

Conventions (as the other modules of `jtl.losses`):
- Per-example values, no reduction; logits of any float dtype, computed in float32.
- Soft targets: p = softmax(z_t / T) (teacher), q = softmax(z_s / T) (student). The soft loss is
  T^2 * KL(p || q) = T^2 * sum_i p_i (log p_i - log q_i), from `log_softmax` only (no naive exp/log),
  so it is finite and exactly 0 for identical logits whatever their scale.
- Why T^2 (Sec. 2 of the paper): dKL/dz_s,i = (q_i - p_i) / T, and for T large against the logits
  q_i - p_i ~ (z_s,i - z_t,i) / (N T) (zero-mean logits, N classes), so the unscaled gradient shrinks
  like 1/T^2; multiplying by T^2 keeps the soft targets' share of the gradient the same when T changes.
- `distillation_loss` is the paper's objective, a convex mix of the hard-label cross-entropy and the
  soft loss: (1 - alpha) CE(labels, z_s) + alpha T^2 KL(p || q). alpha = 0 is plain cross-entropy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jtl.losses.classification import softmax_cross_entropy


def soft_target_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                   temperature: float | jax.Array = 1.0) -> jax.Array:
  """Per-example KL(softmax(teacher / T) || softmax(student / T)) over the last axis, unscaled."""
  t = jnp.asarray(temperature, jnp.float32)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float | jax.Array = 1.0) -> jax.Array:
  """Per-example soft-target loss T^2 KL(p || q) (Hinton et al. 2015, Sec. 2)."""
  t = jnp.asarray(temperature, jnp.float32)
  return t * t * soft_target_kl(student_logits, teacher_logits, t)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      alpha: float | jax.Array, temperature: float | jax.Array) -> jax.Array:
  """Per-example (1 - alpha) CE(labels) + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T))."""
  hard = softmax_cross_entropy(student_logits, labels)
  return (1.0 - alpha) * hard + alpha * kd_loss(student_logits, teacher_logits, temperature)
