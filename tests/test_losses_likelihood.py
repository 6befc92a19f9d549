"""The three error functions against hand computations, and dE/da = y - t for each."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.losses import likelihood

A = np.array([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]], np.float32)


def sigmoid(a):
  return 1 / (1 + np.exp(-a))


def test_regression_is_half_sum_of_squares():
  t = np.array([[1.0, 0.0, 2.5], [0.0, -1.0, 1.0]], np.float32)
  np.testing.assert_allclose(likelihood.regression_error(A, t), 0.5 * ((A - t) ** 2).sum(1),
                             rtol=1e-6)


def test_bernoulli_matches_hand_computation_with_and_without_noise():
  t = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  y = sigmoid(A)
  clean = -(t * np.log(y) + (1 - t) * np.log(1 - y)).sum(1)
  np.testing.assert_allclose(likelihood.bernoulli_error(A, t), clean, rtol=1e-5)
  eps = 0.1
  p = eps + (1 - 2 * eps) * y
  noisy = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum(1)
  np.testing.assert_allclose(likelihood.bernoulli_error(A, t, eps), noisy, rtol=1e-5)
  # Noise caps the loss of a confidently wrong prediction at -ln(eps) per label.
  wrong = likelihood.bernoulli_error(jnp.array([[-50.0]]), jnp.array([[1.0]]), eps)
  np.testing.assert_allclose(wrong, -np.log(eps), rtol=1e-5)


def test_categorical_matches_hand_computation():
  labels = np.array([2, 0])
  y = np.exp(A) / np.exp(A).sum(1, keepdims=True)
  np.testing.assert_allclose(likelihood.categorical_error(A, labels),
                             -np.log(y[np.arange(2), labels]), rtol=1e-5)


@pytest.mark.parametrize("kind", ["regression", "multilabel", "multiclass"])
def test_gradient_wrt_pre_activation_is_y_minus_t(kind):
  if kind == "multiclass":
    labels = np.array([2, 0])
    targets, onehot = labels, np.eye(3, dtype=np.float32)[labels]
  else:
    targets = onehot = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
    if kind == "regression":
      targets = onehot = np.array([[0.5, -2.0, 1.0], [3.0, 0.0, -1.0]], np.float32)
  grad = jax.grad(lambda a: likelihood.task_error(kind, a, targets).sum())(jnp.asarray(A))
  y = likelihood.output_activation(kind, jnp.asarray(A))
  np.testing.assert_allclose(grad, y - onehot, rtol=1e-5, atol=1e-6)


def test_finite_for_extreme_logits():
  a = jnp.array([[1e4, -1e4]])
  for kind, t in (("multilabel", jnp.array([[0.0, 1.0]])), ("multiclass", jnp.array([1]))):
    for eps in (0.0, 0.05) if kind == "multilabel" else (0.0,):
      value, grad = jax.value_and_grad(lambda x: likelihood.task_error(kind, x, t, eps).sum())(a)
      assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_metrics():
  m = likelihood.task_metrics("multilabel", jnp.array([[1.0, -1.0], [1.0, 1.0]]),
                              jnp.array([[1, 0], [0, 1]]))
  np.testing.assert_allclose(m["label_accuracy"], [1.0, 0.5])
  np.testing.assert_allclose(m["exact_match"], [1.0, 0.0])
  m = likelihood.task_metrics("regression", jnp.array([[1.0], [3.0]]), jnp.array([[0.0], [1.0]]))
  np.testing.assert_allclose(m["noise_variance"], [1.0, 4.0])
