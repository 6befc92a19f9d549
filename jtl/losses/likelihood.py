"""Error functions of the three kinds of task, each the negative log-likelihood of its output model.

Per example (summed over the outputs of that example), with pre-activation a and target t:

  regression  y = a (identity);  E = 1/2 sum_k (y_k - t_k)^2, the Gaussian negative log-likelihood
              with unit variance up to a constant. The noise variance is then estimated after training
              as the mean squared residual (its maximum-likelihood value), `noise_variance` below.
  binary /    y = sigmoid(a);  E = -sum_k [t_k ln y_k + (1 - t_k) ln(1 - y_k)], the Bernoulli negative
  multilabel  log-likelihood (one Bernoulli per label). With label-flip probability eps (each label is
              flipped with probability eps before we see it), the likelihood of t = 1 is
              p = eps + (1 - 2 eps) y, and E uses p in place of y.
  multiclass  y = softmax(a);  E = -sum_k t_k ln y_k with t one-hot, the categorical negative
              log-likelihood.

Without label noise each is the canonical link of its distribution, so dE/da = y - t for all three
(`tests/test_losses_likelihood.py` checks it). Everything is computed from log-sigmoid / log-softmax,
never from a rounded probability, so it stays finite for any logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def regression_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """1/2 sum_k (y_k - t_k)^2 per example; `outputs` [B, K] (or [B]), `targets` the same shape."""
  outputs = outputs.astype(jnp.float32)
  residual = outputs.reshape(targets.shape) - targets.astype(jnp.float32)
  return 0.5 * jnp.sum(residual.reshape(residual.shape[0], -1) ** 2, axis=1)


def bernoulli_error(logits: jax.Array, targets: jax.Array, label_noise: float = 0.0) -> jax.Array:
  """Bernoulli NLL per example, summed over labels; `logits`, `targets` [B, K] (targets 0/1).

  With `label_noise` eps > 0: the likelihood of an observed 1 is eps + (1 - 2 eps) sigmoid(a).
  """
  logits = logits.astype(jnp.float32).reshape(targets.shape[0], -1)
  targets = targets.astype(jnp.float32).reshape(logits.shape)
  log_y, log_1my = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  if label_noise:
    eps = jnp.float32(label_noise)
    log_eps, log_keep = jnp.log(eps), jnp.log1p(-2.0 * eps)
    # p = eps + (1 - 2 eps) y and 1 - p = eps + (1 - 2 eps)(1 - y), in log space.
    log_y = jnp.logaddexp(log_eps, log_keep + log_y)
    log_1my = jnp.logaddexp(log_eps, log_keep + log_1my)
  return -jnp.sum(targets * log_y + (1.0 - targets) * log_1my, axis=1)


def categorical_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example; `logits` [B, C], integer `labels` [B]."""
  log_y = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_y, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def output_activation(kind: str, logits: jax.Array) -> jax.Array:
  """y from the pre-activation: identity, sigmoid or softmax by task kind."""
  if kind == "regression":
    return logits
  if kind in ("binary", "multilabel"):
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def task_error(kind: str, outputs: jax.Array, targets: jax.Array,
               label_noise: float = 0.0) -> jax.Array:
  """The error function of a task kind, per example."""
  if kind == "regression":
    return regression_error(outputs, targets)
  if kind in ("binary", "multilabel"):
    return bernoulli_error(outputs, targets, label_noise)
  return categorical_error(outputs, targets)


def task_metrics(kind: str, outputs: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Per-example metrics: accuracy (multiclass, binary), label accuracy and exact match (multilabel),
  the squared residual per output (regression; its split mean is the noise variance estimate)."""
  if kind == "multiclass":
    return {"accuracy": (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)}
  if kind in ("binary", "multilabel"):
    predicted = (outputs.reshape(targets.shape[0], -1) > 0).astype(jnp.int32)
    correct = (predicted == targets.reshape(predicted.shape)).astype(jnp.float32)
    if kind == "binary":
      return {"accuracy": correct[:, 0]}
    return {"label_accuracy": correct.mean(axis=1), "exact_match": correct.min(axis=1)}
  residual = outputs.astype(jnp.float32).reshape(targets.shape) - targets.astype(jnp.float32)
  squared = residual.reshape(residual.shape[0], -1) ** 2
  # Averaged over a split this is the maximum-likelihood noise variance of the Gaussian model.
  return {"noise_variance": squared.mean(axis=1)}
