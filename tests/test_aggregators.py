"""Gram-matrix aggregators against plain numpy/scipy implementations that work on explicit vectors.

Each (method, T) is jit-compiled once and run on the same-shaped problems: three random ones (from
strongly conflicting to mostly aligned) and four degenerate ones (a zero gradient, two identical
gradients, two opposite gradients, all gradients zero). References run in float64 on the vectors.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from jtl.errors import ConfigError
from jtl.multitask import aggregators as agg

DIM = 40
RANDOM = 3  # problems 0..2 are random; 3..6 degenerate
DEGENERATE = ("zero", "duplicate", "opposite", "all_zero")
METHODS = tuple(agg.AGGREGATORS)


def _vectors(num_tasks: int) -> np.ndarray:
  rng = np.random.default_rng(num_tasks)
  shared = rng.normal(size=(RANDOM, 1, DIM))
  random = rng.normal(size=(RANDOM, num_tasks, DIM)) + np.array([0.0, 0.7, 1.5])[:, None, None] * shared
  degenerate = rng.normal(size=(len(DEGENERATE), num_tasks, DIM))
  degenerate[0, 0] = 0.0
  degenerate[1, 1] = degenerate[1, 0]
  degenerate[2, 1] = -degenerate[2, 0]
  degenerate[3] = 0.0
  return np.concatenate([random, degenerate])


@functools.lru_cache(maxsize=None)
def _jitted(fn, **options):
  # The tests check numerics, not speed: unoptimised XLA code compiles about a third faster.
  return jax.jit(functools.partial(fn, **options),
                 compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _run(method: str, num_tasks: int):
  """(vectors [P, T, D], gram [P, T, T] (float64), keys, weights [P, T], metrics) for every problem.

  One compilation per (method, T): the problems share shapes, so they reuse it.
  """
  vectors = _vectors(num_tasks)
  gram = np.einsum("ptd,psd->pts", vectors, vectors)
  keys = jax.random.split(jax.random.key(num_tasks), len(vectors))
  aggregate = _jitted(agg.AGGREGATORS[method])
  results = [aggregate(jnp.asarray(g, jnp.float32), k) for g, k in zip(gram, keys)]
  weights = np.stack([np.asarray(w, np.float64) for w, _ in results])
  metrics = {name: np.stack([np.asarray(m[name], np.float64) for _, m in results])
             for name in results[0][1]}
  return vectors, gram, keys, weights, metrics


def _close(actual, expected, rtol):
  scale = np.max(np.abs(expected)) + 1e-12
  np.testing.assert_allclose(actual, expected, atol=rtol * scale, rtol=0)


def _simplex_minimize(objective, num_tasks):
  res = optimize.minimize(objective, np.full(num_tasks, 1.0 / num_tasks), method="SLSQP",
                          bounds=[(0.0, 1.0)] * num_tasks,
                          constraints=({"type": "eq", "fun": lambda w: np.sum(w) - 1.0},),
                          options={"ftol": 1e-15, "maxiter": 2000})
  return res.x, res.fun


# ---------------------------------------------------------------------------------------------------
# References on explicit vectors (float64)
# ---------------------------------------------------------------------------------------------------

def _pcgrad_reference(vectors, orders):
  total = np.zeros(vectors.shape[1])
  for i, order in enumerate(orders):
    g = vectors[i].copy()
    for j in order:
      dot = g @ vectors[j]
      if dot < 0:
        g = g - dot / (vectors[j] @ vectors[j]) * vectors[j]
    total += g
  return total


def _cagrad_reference(vectors, c):
  g0 = vectors.mean(0)
  radius = c * np.linalg.norm(g0)
  w, fun = _simplex_minimize(lambda w: (w @ vectors) @ g0 + radius * np.linalg.norm(w @ vectors),
                             len(vectors))
  gw = w @ vectors
  return (g0 + radius / np.linalg.norm(gw) * gw) / (1 + c ** 2), fun


def _imtl_reference(vectors):
  # The paper's closed form: alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:T}.
  units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  d_mat, u_mat = vectors[0] - vectors[1:], units[0] - units[1:]
  rest = vectors[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.concatenate([[1 - rest.sum()], rest]) @ vectors


def _nash_reference(vectors):
  # Nash bargaining solution: alpha > 0 with g_i . d = 1 / alpha_i, d = sum alpha_i g_i.
  num_tasks = len(vectors)
  res = optimize.minimize(
      lambda a: 0.5 * np.sum((a @ vectors) ** 2) - np.sum(np.log(a)), np.ones(num_tasks),
      jac=lambda a: vectors @ (a @ vectors) - 1 / a, method="L-BFGS-B",
      bounds=[(1e-9, None)] * num_tasks, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
  alpha = optimize.root(lambda a: a * (vectors @ (a @ vectors)) - 1, res.x, tol=1e-14).x
  return alpha @ vectors


def _dual_cone_projection_reference(vectors, i):
  # Primal QP in vector space: argmin_x |x - g_i|^2 s.t. g_j . x >= 0 for all j.
  res = optimize.minimize(lambda x: np.sum((x - vectors[i]) ** 2), vectors[i], method="SLSQP",
                          jac=lambda x: 2 * (x - vectors[i]),
                          constraints=({"type": "ineq", "fun": lambda x: vectors @ x,
                                        "jac": lambda x: vectors},),
                          options={"ftol": 1e-15, "maxiter": 2000})
  return res.x


def _reference(method, vectors, key):
  num_tasks = len(vectors)
  if method == "pcgrad":
    orders = _jitted(agg.pcgrad_orders, num_tasks=num_tasks)(key)
    return _pcgrad_reference(vectors, np.asarray(orders))
  if method == "mgda":
    w, _ = _simplex_minimize(lambda w: np.sum((w @ vectors) ** 2), num_tasks)
    return w @ vectors
  if method == "cagrad":
    return _cagrad_reference(vectors, 0.5)[0]
  if method == "imtl":
    return _imtl_reference(vectors)
  if method == "nash":
    return _nash_reference(vectors)
  return np.mean([_dual_cone_projection_reference(vectors, i) for i in range(num_tasks)], axis=0)


# ---------------------------------------------------------------------------------------------------
# Every method
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tasks", [2, 8])
@pytest.mark.parametrize("method", METHODS)
def test_weights_combined_with_vectors_match_vector_reference(method, num_tasks):
  vectors, _, keys, weights, metrics = _run(method, num_tasks)
  # The random problems, and two identical gradients (the paper's IMTL formula is singular there).
  duplicate = RANDOM + DEGENERATE.index("duplicate")
  for p in list(range(RANDOM)) + ([] if method == "imtl" else [duplicate]):
    _close(agg.combine(weights[p], vectors[p]), _reference(method, vectors[p], keys[p]), 2e-4)
  assert metrics["conflicting_pairs"][0] > 0  # the first problem really has conflicts


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_gradients_give_finite_weights(method):
  for num_tasks in (2, 8):
    _, _, _, weights, metrics = _run(method, num_tasks)
    assert np.all(np.isfinite(weights[RANDOM:])), (num_tasks, weights[RANDOM:])
    for name, value in metrics.items():
      assert np.all(np.isfinite(value)), (num_tasks, name, value)


@pytest.mark.parametrize("method", METHODS)
def test_one_task_is_the_plain_gradient(method):
  weights, _ = _jitted(agg.AGGREGATORS[method])(jnp.array([[2.5]]), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(weights), [1.0])


def test_combine_sums_over_the_task_axis_of_every_leaf():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=3).astype(np.float32)
  grads = {"a": rng.normal(size=(3, 4, 2)).astype(np.float32), "b": rng.normal(size=(3,))}
  out = agg.combine(jnp.asarray(weights), jax.tree.map(jnp.asarray, grads))
  np.testing.assert_allclose(out["a"], np.einsum("t,tij->ij", weights, grads["a"]), rtol=1e-5)
  np.testing.assert_allclose(out["b"], weights @ grads["b"], rtol=1e-5)


def test_bad_options_raise_config_error_naming_the_valid_ones():
  gram = jnp.eye(3)
  with pytest.raises(ConfigError, match="valid options: bisection_steps, c, max_iterations, rescale"):
    agg.AGGREGATORS["cagrad"](gram, None, alpha=0.5)
  with pytest.raises(ConfigError, match="valid options: none"):
    agg.make_aggregator("imtl", c=0.5)
  with pytest.raises(ConfigError, match=r"c=1.5 is out of range; it must be a float in \[0, 1\)"):
    agg.cagrad(gram, c=1.5)
  for name, options in [("cagrad", {"rescale": 3}), ("nash", {"max_iterations": 0}),
                        ("upgrad", {"max_iterations": 2.5}), ("nash", {"tolerance": -1.0})]:
    with pytest.raises(ConfigError, match="out of range"):
      agg.make_aggregator(name, **options)
  with pytest.raises(ConfigError, match="use one of pcgrad, mgda, cagrad, imtl, nash, upgrad"):
    agg.make_aggregator("gradnorm")


# ---------------------------------------------------------------------------------------------------
# Method-specific properties
# ---------------------------------------------------------------------------------------------------

def test_pcgrad_orders_are_random_orders_of_the_other_tasks():
  orders_of = _jitted(agg.pcgrad_orders, num_tasks=8)
  orders = np.asarray(orders_of(jax.random.key(1)))
  for i, order in enumerate(orders):
    assert sorted(order) == [j for j in range(8) if j != i]
  assert not np.array_equal(orders, np.asarray(orders_of(jax.random.key(2))))


def test_pcgrad_two_tasks_projections_no_longer_conflict():
  vectors, _, _, weights, metrics = _run("pcgrad", 2)
  g1, g2 = vectors[0]
  assert g1 @ g2 < 0 and metrics["projections"][0] == 2
  # For T = 2, w = (1 + b, 1 + a) with g1' = g1 + a g2 and g2' = g2 + b g1.
  projected_1, projected_2 = g1 + (weights[0, 1] - 1) * g2, g2 + (weights[0, 0] - 1) * g1
  scale = np.linalg.norm(g1) * np.linalg.norm(g2)
  assert projected_1 @ g2 > -1e-5 * scale and projected_2 @ g1 > -1e-5 * scale


def test_mgda_two_tasks_is_the_closed_form_min_norm_point():
  vectors, _, _, weights, _ = _run("mgda", 2)
  for p in range(RANDOM):
    g1, g2 = vectors[p]
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0, 1.0)
    np.testing.assert_allclose(weights[p], [gamma, 1 - gamma], atol=1e-5)
  # A short gradient inside the other's half-space is itself the min-norm point (a clipped case).
  w, _ = _jitted(agg.AGGREGATORS["mgda"])(jnp.array([[1.0, 2.0], [2.0, 9.0]]), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("num_tasks", [4, 8])
def test_mgda_matches_scipy_on_the_simplex(num_tasks):
  _, gram, _, weights, _ = _run("mgda", num_tasks)
  for p in range(RANDOM):
    w = weights[p]
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    _, best = _simplex_minimize(lambda v: v @ gram[p] @ v, num_tasks)
    assert abs(w @ gram[p] @ w - best) <= 1e-5 * best, (w @ gram[p] @ w, best)


def test_mgda_drops_a_gradient_the_active_set_took_first():
  # Task 0 lies far beyond the min-norm point m of the others, so it is not in the optimal support;
  # the active-set solver adds it first (all multipliers tie at the start) and must release it later.
  others = _vectors(4)[0, 1:]
  m = _simplex_minimize(lambda w: np.sum((w @ others) ** 2), 3)[0] @ others
  vectors = np.concatenate([[3 * m + 0.1 * np.linalg.norm(m) * _vectors(4)[1, 0] / DIM ** 0.5], others])
  gram = vectors @ vectors.T
  w, metrics = _jitted(agg.AGGREGATORS["mgda"])(jnp.asarray(gram, jnp.float32), jax.random.key(0))
  w = np.asarray(w, np.float64)
  assert w[0] == 0 and metrics["solver_iterations"] > np.sum(w > 0) + 1  # took the release step
  _, best = _simplex_minimize(lambda v: v @ gram @ v, 4)
  assert abs(w @ gram @ w - best) <= 1e-5 * best


@pytest.mark.parametrize("num_tasks", [2, 8])
def test_cagrad_inner_problem_reaches_scipy_minimum(num_tasks):
  vectors, _, _, _, metrics = _run("cagrad", num_tasks)
  for p in range(RANDOM):
    _, best = _cagrad_reference(vectors[p], 0.5)
    scale = np.max(np.sum(vectors[p] ** 2, axis=1))
    found = metrics["inner_objective"][p]
    assert abs(found - best) <= 1e-5 * scale, (found, best)


def test_cagrad_with_c_zero_is_the_mean():
  w, _ = _jitted(agg.AGGREGATORS["cagrad"], c=0.0)(jnp.eye(4) - 0.2, None)
  np.testing.assert_array_equal(np.asarray(w), np.full(4, 0.25, np.float32))


@pytest.mark.parametrize("num_tasks", [2, 8])
def test_imtl_projections_onto_unit_gradients_are_equal(num_tasks):
  vectors, _, _, weights, _ = _run("imtl", num_tasks)
  for p in list(range(RANDOM)) + [RANDOM + DEGENERATE.index("duplicate")]:
    assert abs(weights[p].sum() - 1) < 1e-5
    units = vectors[p] / np.linalg.norm(vectors[p], axis=1, keepdims=True)
    projections = units @ (weights[p] @ vectors[p])
    np.testing.assert_allclose(projections, projections.mean(), rtol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 8])
def test_nash_solves_the_bargaining_equation(num_tasks):
  _, gram, _, weights, _ = _run("nash", num_tasks)
  for p in range(RANDOM):
    alpha = weights[p]
    assert np.all(alpha > 0)
    np.testing.assert_allclose(alpha * (gram[p] @ alpha), 1.0, atol=1e-4)
    np.testing.assert_allclose(alpha @ gram[p] @ alpha, num_tasks, rtol=1e-4)  # so |d| = sqrt(T)


def test_upgrad_projections_lie_in_the_dual_cone_and_match_scipy():
  vectors = _vectors(8)[:RANDOM]
  for p, g in enumerate(vectors):
    gram = g @ g.T
    v = np.asarray(_jitted(agg.dual_cone_projections)(jnp.asarray(gram, jnp.float32)), np.float64)
    assert np.all(v >= np.eye(8) - 1e-6)
    assert np.min(v @ gram) >= -1e-5 * np.max(np.diag(gram))
    for i in range(8):
      _close(v[i] @ g, _dual_cone_projection_reference(g, i), 1e-4)


def test_upgrad_without_conflicts_is_the_mean_gradient():
  vectors = np.abs(np.random.default_rng(3).normal(size=(8, DIM)))  # all pairwise products > 0
  w, metrics = _jitted(agg.AGGREGATORS["upgrad"])(jnp.asarray(vectors @ vectors.T, jnp.float32),
                                                   jax.random.key(0))
  assert metrics["conflicting_pairs"] == 0
  np.testing.assert_array_equal(np.asarray(w), np.full(8, 0.125, np.float32))
