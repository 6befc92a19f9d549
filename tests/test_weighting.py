"""Tests for jtl.multitask.weighting against analytic values and plain NumPy references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.errors import ConfigError
from jtl.multitask.weighting import WEIGHTINGS, make_weighting

STEP = jnp.int32(0)


def _jitted_total(method):
  """`total` under jit, as the objective calls it: (losses, params, state, rng, grad_norms) -> result."""
  return jax.jit(lambda losses, params, state, rng, grad_norms: method.total(
      losses, params=params, state=state, rng=rng, step=STEP, grad_norms=grad_norms))


def _weights(metrics, num_tasks):
  return np.array([float(metrics[f"w_{t}"]) for t in range(num_tasks)])


def test_uncertainty_gradients_match_analytic():
  kinds = ("regression", "classification", "regression")
  method = make_weighting("uncertainty", kinds=kinds)
  c = np.array([0.5, 1.0, 0.5])
  s = np.array([0.3, -0.5, 1.2], np.float32)
  losses = np.array([0.7, 2.0, 0.1], np.float32)

  def total(losses, s):
    return method.total(losses, params={"log_variance": s}, state={}, rng=None, step=STEP)[0]

  grad_losses, grad_s = jax.grad(total, argnums=(0, 1))(jnp.asarray(losses), jnp.asarray(s))
  np.testing.assert_allclose(grad_s, -c * np.exp(-s) * losses + 0.5, rtol=1e-5)
  np.testing.assert_allclose(grad_losses, c * np.exp(-s), rtol=1e-5)
  np.testing.assert_allclose(total(losses, s), np.sum(c * np.exp(-s) * losses + s / 2), rtol=1e-5)
  params = method.init_params(3)
  np.testing.assert_allclose(total(losses, params["log_variance"]), np.sum(c * losses), rtol=1e-6)


def test_dwa_weights_follow_window_means():
  window, temperature, num_tasks = 2, 2.0, 3
  method = make_weighting("dwa", window=window, temperature=temperature)
  sequence = np.random.default_rng(0).uniform(0.2, 3.0, size=(8, num_tasks)).astype(np.float32)
  call, state = _jitted_total(method), method.init_state(num_tasks)
  applied = []
  for losses in sequence:
    _, state, metrics = call(jnp.asarray(losses), {}, state, None, None)
    applied.append(_weights(metrics, num_tasks))
  window_means = sequence.reshape(-1, window, num_tasks).mean(axis=1)  # [4, T]

  def dwa(k):  # weights in window k from the means of windows k-1 and k-2, the paper's eq. 7
    r = window_means[k - 1] / window_means[k - 2]
    e = np.exp(r / temperature)
    return num_tasks * e / e.sum()

  np.testing.assert_allclose(applied[:4], np.ones((4, num_tasks)), rtol=1e-6)  # windows 0 and 1
  for step in range(4, 8):
    np.testing.assert_allclose(applied[step], dwa(step // window), rtol=1e-5)
  assert not np.allclose(applied[4], applied[6])


def test_rlw_weights_random_per_key_and_deterministic():
  method = make_weighting("rlw")
  call, losses = _jitted_total(method), jnp.array([1.0, 2.0, 3.0, 4.0])
  draws = [_weights(call(losses, {}, {}, jax.random.key(seed), None)[2], 4) for seed in (0, 1, 0)]
  for w in draws:
    assert np.all(w > 0)
    np.testing.assert_allclose(w.sum(), 4.0, rtol=1e-5)
  assert not np.allclose(draws[0], draws[1])
  np.testing.assert_array_equal(draws[0], draws[2])


def _gradnorm_reference(weights, norms, losses, initial, alpha, lr):
  """GradNorm eq. 2 and one step on w, written out: (L_grad, new weights summing to T)."""
  g = weights * norms
  ratio = (losses / initial) / np.mean(losses / initial)
  target = np.mean(g) * ratio ** alpha
  new = np.maximum(weights - lr * np.sign(g - target) * norms, 1e-4)
  return np.abs(g - target).sum(), len(weights) * new / new.sum()


def test_gradnorm_step_lowers_grad_loss_and_keeps_scale():
  alpha, lr = 1.5, 0.05
  method = make_weighting("gradnorm", alpha=alpha, lr=lr)
  call, state = _jitted_total(method), method.init_state(3)
  norms, losses = np.array([1.0, 2.0, 0.5], np.float32), np.array([2.0, 1.0, 0.5], np.float32)
  grad_losses = []
  weights = np.ones(3)
  for _ in range(3):  # fixed inputs: the first call also sets L(0) = losses
    _, state, metrics = call(jnp.asarray(losses), {}, state, None, jnp.asarray(norms))
    np.testing.assert_allclose(_weights(metrics, 3), weights, rtol=1e-5)  # the weights before the step
    expected_loss, weights = _gradnorm_reference(weights, norms, losses, losses, alpha, lr)
    np.testing.assert_allclose(metrics["gradnorm_loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(state["weights"], weights, rtol=1e-5)
    assert np.all(weights > 0) and np.isclose(weights.sum(), 3.0)
    grad_losses.append(float(metrics["gradnorm_loss"]))
  assert grad_losses[0] > grad_losses[1] > grad_losses[2]


def test_gradnorm_slow_task_gains_weight():
  method = make_weighting("gradnorm", alpha=1.5, lr=0.05)
  call, state = _jitted_total(method), method.init_state(3)
  norms = jnp.ones(3)
  _, state, _ = call(jnp.ones(3), {}, state, None, norms)  # L(0) = 1: r = 1, G on target, no step
  np.testing.assert_allclose(state["weights"], np.ones(3), rtol=1e-6)
  _, state, _ = call(jnp.array([0.9, 0.5, 0.2]), {}, state, None, norms)  # task 0 trains slowest
  w = np.asarray(state["weights"])
  assert w[0] > 1.0 > w[2] and w[0] > w[1] >= w[2]
  np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-6)


def _famo_reference(sequence, lr, gamma):
  """FAMO Algorithm 1 in NumPy with the one-step delay: applied weights T c z / L and the logits."""
  num_tasks = sequence.shape[1]
  xi, applied, shares = np.zeros(num_tasks), [], []
  for k, losses in enumerate(sequence.astype(np.float64)):
    if k > 0:
      z = np.exp(xi) / np.exp(xi).sum()
      jacobian = np.diag(z) - np.outer(z, z)
      delta = np.log(sequence[k - 1]) - np.log(losses)
      xi = xi - lr * (jacobian.T @ delta + gamma * xi)
    z = np.exp(xi) / np.exp(xi).sum()
    c = 1.0 / np.sum(z / losses)
    applied.append(num_tasks * c * z / losses)
    shares.append(z)
  return np.array(applied), np.array(shares)


def test_famo_equal_decrease_keeps_equal_weights():
  method = make_weighting("famo")
  call, state = _jitted_total(method), method.init_state(3)
  for k in range(6):
    _, state, metrics = call(jnp.full(3, 2.0 * 0.9 ** k), {}, state, None, None)
    np.testing.assert_allclose(_weights(metrics, 3), np.ones(3), rtol=1e-5)


def test_famo_stalled_task_gains_weight():
  lr, gamma = 0.5, 1e-3
  method = make_weighting("famo", lr=lr, gamma=gamma)
  call, state = _jitted_total(method), method.init_state(2)
  # Both tasks fall by 10% per step; task 1 stops falling after step 3.
  sequence = np.array([[0.9 ** k, 0.9 ** min(k, 3)] for k in range(10)], np.float32)
  applied, shares = [], []
  for losses in sequence:
    _, state, metrics = call(jnp.asarray(losses), {}, state, None, None)
    applied.append(_weights(metrics, 2))
    shares.append(np.asarray(jax.nn.softmax(state["logits"])))
  applied, shares = np.array(applied), np.array(shares)
  expected_applied, expected_shares = _famo_reference(sequence, lr, gamma)
  np.testing.assert_allclose(applied, expected_applied, rtol=1e-4)
  np.testing.assert_allclose(shares, expected_shares, rtol=1e-4)
  np.testing.assert_allclose(applied.sum(axis=1), 2.0, rtol=1e-5)
  np.testing.assert_allclose(shares[:4], 0.5, rtol=1e-6)
  assert np.all(np.diff(shares[3:, 1]) > 0)  # the stalled task's share z_1 grows every step
  # ... and the weight it gets beats the non-adaptive 1/L weighting (z fixed at 1/2) from then on.
  fixed_share = 2 * (1 / sequence) / (1 / sequence).sum(axis=1, keepdims=True)
  assert np.all(applied[4:, 1] > fixed_share[4:, 1] + 1e-3)


OPTIONS = {"equal": {}, "static": {"weights": (1.0, 0.5, 2.0)},
           "uncertainty": {"kinds": ("regression", "classification", "classification")},
           "dwa": {"window": 1}, "rlw": {}, "gradnorm": {}, "famo": {}}
SUMS_TO_T = {"equal", "dwa", "rlw", "gradnorm", "famo"}


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_method_jits_with_finite_gradients(name):
  assert set(OPTIONS) == set(WEIGHTINGS)
  method = make_weighting(name, **OPTIONS[name])
  params, state = method.init_params(3), method.init_state(3)
  norms = jnp.array([0.5, 1.0, 2.0]) if method.needs_grad_norms else None

  @jax.jit
  def step(losses, params, state, rng):
    def total(losses, params):
      value, new_state, metrics = method.total(losses, params=params, state=state, rng=rng,
                                               step=STEP, grad_norms=norms)
      return value, (new_state, metrics)
    return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(losses, params)

  for k in range(3):  # dwa with window 1 reaches its adaptive regime at the third call
    losses = jnp.array([1.0, 0.5, 2.0]) * 0.8 ** (k * jnp.arange(1, 4))
    (value, (state, metrics)), (grad_losses, grad_params) = step(losses, params, state,
                                                                 jax.random.key(k))
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves((grad_losses, grad_params)))
    w = _weights(metrics, 3)
    np.testing.assert_allclose(grad_losses, w, rtol=1e-5)  # d total / d L_t is the weight applied
    assert jax.tree.structure(state) == jax.tree.structure(method.init_state(3))
    if name in SUMS_TO_T:
      np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-5)


@pytest.mark.parametrize("name, options, match", [
    ("equal", {"scale": 2.0}, "unknown option 'scale'.*valid options: none"),
    ("dwa", {"temprature": 2.0}, "did you mean 'temperature'.*valid options: temperature, window"),
    ("dwa", {"temperature": 0.0}, "temperature=0.0"),
    ("dwa", {"window": 0}, "window=0"),
    ("static", {}, "weights"),
    ("static", {"weights": (1.0, -1.0)}, "weights=-1.0"),
    ("uncertainty", {"kinds": ("regression", "segmentation")}, "kinds"),
    ("rlw", {"seed": 0}, "unknown option 'seed'"),
    ("gradnorm", {"lr": -0.1}, "lr=-0.1"),
    ("gradnorm", {"alpha": float("nan")}, "alpha=nan"),
    ("famo", {"gamma": -1.0}, "gamma=-1.0.*valid options: lr, gamma"),
    ("eqaul", {}, "did you mean 'equal'"),
])
def test_bad_options_are_config_errors(name, options, match):
  with pytest.raises(ConfigError, match=match) as error:
    make_weighting(name, **options)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, options", [("static", {"weights": (1.0, 2.0)}),
                                           ("uncertainty", {"kinds": ("regression",)})])
def test_per_task_options_must_match_num_tasks(name, options):
  method = make_weighting(name, **options)
  with pytest.raises(ConfigError, match="per task"):
    method.init_params(3) if name == "uncertainty" else method.init_state(3)
