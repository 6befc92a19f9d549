"""Multitask gradient aggregators computed from the T x T Gram matrix of the task gradients alone.

Every method maps G = [g_i . g_j] (plus a PRNG key or options where it needs them) to coefficients w [T];
the update direction is d = sum_t w_t g_t (`combine`). Whatever a paper does to gradient vectors stays in
their span, so a vector g' = sum_k C_k g_k is carried as its coefficients C and every inner product is
read off G (g' . g'' = C G C''^T). The objective can therefore run ONE backward pass through the trunk
with the cotangent sum_t w_t dL_t/dz instead of T of them.

Entry points: `AGGREGATORS[name](gram, key, **options) -> (w, metrics)` for every method (metrics are
scalars to log), `make_aggregator(name, **options)` to validate a config before tracing, and one
function per method returning w. `combine(w, grads)` forms d from [T, ...] gradients.

Conventions
- T is static; every method returns [1.] for T = 1 (one task: the plain gradient).
- Weights are constants for differentiation (stop_gradient on G), as in every reference implementation.
- Where a method solves with G, G is symmetrised, divided by its mean diagonal s (the weights do not
  depend on the gradients' scale) and regularised by `gram_solvers.REG` I (a tiny multiple of the trace), so zero
  or duplicate gradients give finite weights.
- Matmuls run at full float32 precision (never TF32 or bfloat16 passes); the Gram matrix given to
  them should be computed the same way (`precision="highest"`).
- Every solver jits and vmaps: `lax.fori_loop`, or `lax.while_loop` with a tolerance and a cap. The
  simplex and box QPs (MGDA, CAGrad's inner problem, UPGrad) share one exact active-set solver,
  Lawson & Hanson's NNLS written on the Gram matrix; Nash-MTL uses a damped Newton method.
- Scales, i.e. what d = sum_t w_t g_t equals, after each paper and its reference code:
    pcgrad  the sum of the projected gradients (Yu et al. 2020, Alg. 1)
    mgda    the min-norm point of the convex hull of the g_t, w on the simplex (Sener & Koltun 2018)
    cagrad  (g0 + c|g0| g_w/|g_w|) / (1 + c^2), g0 the mean gradient (Liu et al. 2021, Alg. 1, with the
            reference code's default rescale=1; that code then multiplies by T to match a summed loss)
    imtl    sum_t alpha_t g_t with sum_t alpha_t = 1 (Liu et al. 2021, "Towards impartial multi-task
            learning", IMTL-G)
    nash    sum_t alpha_t g_t with alpha_i (G alpha)_i = 1, so |d| = sqrt(T) (Navon et al. 2022; the
            reference code also clips the update norm, which `optim.clip_norm` does here)
    upgrad  the mean of the projections of the g_t onto the dual cone {x : g_j . x >= 0 for all j}
            (Quinton & Layne 2024, Prop. 1, eq. 5; torchjd's UPGrad)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jtl.errors import ConfigError
from jtl.multitask import gram_solvers as gs

Metrics = dict[str, jax.Array]

def _is_int(v: Any, low: int) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_float(v: Any, low: float, high: float) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


_ITERATIONS = (lambda v: v is None or _is_int(v, 1), "None or an int >= 1")
_OPTIONS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "pcgrad": {},
    "mgda": {"max_iterations": _ITERATIONS},
    "cagrad": {"c": (lambda v: _is_float(v, 0.0, 1.0) and v < 1, "a float in [0, 1)"),
               "rescale": (lambda v: _is_int(v, 0) and v <= 2, "0, 1 or 2"),
               "bisection_steps": (lambda v: _is_int(v, 1), "an int >= 1"),
               "max_iterations": _ITERATIONS},
    "imtl": {},
    "nash": {"max_iterations": (lambda v: _is_int(v, 1), "an int >= 1"),
             "tolerance": (lambda v: _is_float(v, 1e-12, 1.0), "a float in [1e-12, 1]")},
    "upgrad": {"max_iterations": _ITERATIONS},
}


def _check_options(method: str, options: dict[str, Any]) -> None:
  """Raises ConfigError for an unknown option name or an out-of-range value, naming the valid ones."""
  valid = _OPTIONS[method]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ConfigError(f"unknown {method} aggregator option(s) {unknown}; valid options: "
                      f"{', '.join(sorted(valid)) or 'none'}")
  for name, value in options.items():
    check, requirement = valid[name]
    if not check(value):
      raise ConfigError(f"{method} aggregator option {name}={value!r} is out of range; it must be "
                        f"{requirement}")


def _one_task(gram: jax.Array) -> tuple[jax.Array, Metrics]:
  return jnp.ones((1,), gram.dtype), {}


def pcgrad_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """[T, T-1] int: row i is the random order in which PCGrad projects g_i onto the other tasks."""
  # Argsort of iid uniforms is a uniform random permutation; +inf sends task i itself last. One draw
  # for all rows: a vmapped `jax.random.permutation` compiles several times slower.
  draws = jax.random.uniform(key, (num_tasks, num_tasks)) + jnp.diag(jnp.full((num_tasks,), jnp.inf))
  return jnp.argsort(draws, axis=1)[:, :num_tasks - 1]


@gs.full_precision
def _pcgrad(gram: jax.Array, key: jax.Array) -> tuple[jax.Array, Metrics]:
  gram = gs.as_gram(gram)
  n = gram.shape[0]
  if n == 1:
    return _one_task(gram)
  if key is None:
    raise ValueError("pcgrad needs a PRNG key for its random task orders")
  orders, sq_norms = pcgrad_orders(key, n), jnp.diag(gram)

  def body(k, carry):
    coeffs, projections = carry  # coeffs[i]: g_i' in the basis of the original gradients
    j = orders[:, k]
    inner = jnp.sum(coeffs * gram[:, j].T, axis=1)  # g_i' . g_j
    conflict = (inner < 0) & (sq_norms[j] > 0)
    factor = jnp.where(conflict, inner / jnp.where(conflict, sq_norms[j], 1.0), 0.0)
    return coeffs.at[jnp.arange(n), j].add(-factor), projections + jnp.sum(conflict)

  coeffs, projections = jax.lax.fori_loop(
      0, n - 1, body, (jnp.eye(n, dtype=gram.dtype), jnp.zeros((), jnp.int32)))
  return jnp.sum(coeffs, axis=0), {"projections": projections.astype(jnp.float32)}


def pcgrad(gram: jax.Array, key: jax.Array) -> jax.Array:
  """PCGrad (Yu et al. 2020, Alg. 1). g_i' starts at g_i; for the other tasks j in a random order
  (`pcgrad_orders(key, T)`), g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j whenever g_i' . g_j < 0.
  d equals the SUM of the projected gradients g_i'."""
  return _pcgrad(gram, key)[0]


@gs.full_precision
def _mgda(gram: jax.Array, max_iterations: int | None = None) -> tuple[jax.Array, Metrics]:
  _check_options("mgda", {"max_iterations": max_iterations})
  gram = gs.as_gram(gram)
  n = gram.shape[0]
  if n == 1:
    return _one_task(gram)
  unit, _ = gs.normalized(gram)
  if n == 2:  # the closed form of the two-point problem (Sener & Koltun 2018, Alg. 1)
    w1 = jnp.clip((unit[1, 1] - unit[0, 1]) / (unit[0, 0] + unit[1, 1] - 2 * unit[0, 1]), 0.0, 1.0)
    w, iterations = jnp.stack([w1, 1.0 - w1]), jnp.zeros((), jnp.int32)
  else:
    w, _, iterations = gs.min_norm_weights(unit, gs.iterations(max_iterations, n))
  return w, {"min_norm": jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0)),
             "solver_iterations": iterations.astype(jnp.float32)}


def mgda(gram: jax.Array, max_iterations: int | None = None) -> jax.Array:
  """MGDA-UB (Sener & Koltun 2018): w = argmin_{w in simplex} w^T G w, so d is the min-norm point of
  the convex hull of the task gradients. Closed form for T = 2; for T > 2 an exact active-set solve
  (NNLS, at most `max_iterations` steps, default 4T + 10) instead of the paper's Frank-Wolfe steps."""
  return _mgda(gram, max_iterations)[0]


@gs.full_precision
def _cagrad(gram: jax.Array, c: float = 0.5, rescale: int = 1, bisection_steps: int = 32,
            max_iterations: int | None = None) -> tuple[jax.Array, Metrics]:
  _check_options("cagrad", {"c": c, "rescale": rescale, "bisection_steps": bisection_steps,
                            "max_iterations": max_iterations})
  gram = gs.as_gram(gram)
  n = gram.shape[0]
  if n == 1:
    return _one_task(gram)
  denominator = (1.0, 1.0 + c ** 2, 1.0 + c)[rescale]
  mean = jnp.full((n,), 1.0 / n, gram.dtype)
  if c == 0:
    return mean / denominator, {}
  unit, scale = gs.normalized(gram)
  g_dot_g0 = unit @ mean
  g0_sq = jnp.maximum(mean @ g_dot_g0, 0.0)
  radius = c * jnp.sqrt(g0_sq)  # sqrt(phi) = c |g0|
  safe_radius = jnp.where(radius > 0, radius, 1.0)
  top = jnp.sqrt(jnp.max(jnp.diag(unit)))  # max_i |g_i|

  def norm_of(w):
    return jnp.sqrt(jnp.maximum(w @ unit @ w, 0.0))

  # F(w) = g_w . g0 + radius |g_w| and |x| = min_t |x|^2 / (2t) + t / 2, so min_w F = min_t phi(t) where
  # w(t) minimises g_w . g0 + radius |g_w|^2 / (2t): the projection of -(t / radius) g0 onto the hull,
  # i.e. the min-norm point of the points g_i + (t / radius) g0. phi is convex (a partial minimum of a
  # jointly convex function) and phi'(t) has the sign of t - |g_w(t)|: bisect on that sign in
  # [0, max_i |g_i|]. Step 0 evaluates the top end (sign >= 0) so that w_hi is always some w(t).
  def bisect(k, carry):
    lo, hi, w_hi, passive = carry
    t = jnp.where(k == 0, hi, 0.5 * (lo + hi))
    shift = t / safe_radius
    shifted = unit + shift * (g_dot_g0[:, None] + g_dot_g0[None, :]) + shift ** 2 * g0_sq
    shifted = shifted / (jnp.trace(shifted) / n) + gs.REG * jnp.eye(n, dtype=unit.dtype)
    # Warm start from the last support: it barely moves between bisection steps.
    w_t, passive, _ = gs.min_norm_weights(shifted, gs.iterations(max_iterations, n), passive)
    above = (k == 0) | (t >= norm_of(w_t))
    return (jnp.where(above, lo, t), jnp.where(above, t, hi), jnp.where(above, w_t, w_hi), passive)

  lo, hi, w, _ = jax.lax.fori_loop(0, bisection_steps + 1, bisect,
                                   (jnp.zeros_like(top), top, mean, jnp.zeros(n, bool)))
  gw_norm = norm_of(w)
  # |g_w*| below what a float32 Gram matrix resolves: treat it as 0, so d = g0 (as the reference does).
  usable = (radius > 0) & (gw_norm > 1e-4 * top)
  lam = jnp.where(usable, radius / jnp.where(usable, gw_norm, 1.0), 0.0)
  metrics = {"inner_objective": scale * (w @ g_dot_g0 + radius * gw_norm),
             "gw_norm": jnp.sqrt(scale) * gw_norm, "bisection_gap": jnp.sqrt(scale) * (hi - lo)}
  return (mean + lam * w) / denominator, metrics


def cagrad(gram: jax.Array, c: float = 0.5, rescale: int = 1, bisection_steps: int = 32,
           max_iterations: int | None = None) -> jax.Array:
  """CAGrad (Liu et al. 2021, Alg. 1): g0 = mean gradient, phi = c^2 |g0|^2,
  w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) |g_w|, d = (g0 + sqrt(phi) / |g_w*| g_w*) / (1 + c^2)
  (rescale=1, the reference default; 0: no division; 2: divide by 1 + c). c in [0, 1), the paper's
  range. The inner problem is solved by `bisection_steps` bisections on |g_w*| (float32 resolution
  after ~25), each an exact min-norm solve. T = 1 returns [1.], not (1 + c) / (1 + c^2)."""
  return _cagrad(gram, c, rescale, bisection_steps, max_iterations)[0]


@gs.full_precision
def _imtl(gram: jax.Array) -> tuple[jax.Array, Metrics]:
  gram = gs.as_gram(gram)
  n = gram.shape[0]
  if n == 1:
    return _one_task(gram)
  unit, scale = gs.normalized(gram)
  norms = jnp.sqrt(jnp.maximum(jnp.diag(unit) - gs.REG, 0.0))
  # d . u_t = (G alpha)_t / |g_t| is the same for all t  <=>  G alpha = c |g|. The paper's closed form
  # alpha_{2:T} = g_1 U^T (D U^T)^{-1} is this solution normalised to sum alpha = 1. A zero gradient
  # gets alpha_t = 0: its row of the regularised system reads gs.REG alpha_t = 0.
  x = jnp.linalg.solve(unit, norms)
  tiny = jnp.finfo(gram.dtype).tiny
  alpha = x / jnp.where(jnp.abs(jnp.sum(x)) > tiny, jnp.sum(x), tiny)
  projections = (unit @ alpha) / jnp.where(norms > 0, norms, 1.0)
  projections = jnp.where(norms > 0, projections, projections[jnp.argmax(norms)])
  return alpha, {"projection": jnp.sqrt(scale) * jnp.mean(projections),
                 "projection_spread": jnp.sqrt(scale) * (jnp.max(projections) - jnp.min(projections))}


def imtl_g(gram: jax.Array) -> jax.Array:
  """IMTL-G (Liu et al. 2021, "Towards impartial multi-task learning"), closed form: alpha with
  sum alpha = 1 such that d = sum_t alpha_t g_t has the same projection onto every unit gradient.
  Zero gradients get weight 0. The common projection can be negative when gradients conflict strongly
  (the paper's formula gives the same alpha); the `projection` metric shows it."""
  return _imtl(gram)[0]


@gs.full_precision
def _nash(gram: jax.Array, max_iterations: int = 50,
          tolerance: float = 1e-5) -> tuple[jax.Array, Metrics]:
  _check_options("nash", {"max_iterations": max_iterations, "tolerance": tolerance})
  gram = gs.as_gram(gram)
  n = gram.shape[0]
  if n == 1:
    return _one_task(gram)
  unit, scale = gs.normalized(gram)

  def residual(alpha):
    return alpha * (unit @ alpha) - 1.0

  def body(state):
    alpha, it, _ = state
    # f(alpha) = alpha^T G alpha / 2 - sum log alpha is strictly convex and self-concordant, and its
    # stationary point solves alpha * (G alpha) = 1. Scaled by D = diag(alpha), the Newton system is
    # (D G D + I) z = r, r = alpha * (G alpha) - 1 (eigenvalues >= 1), and the step is -alpha * z.
    r = residual(alpha)
    z = jnp.linalg.solve(alpha[:, None] * unit * alpha[None, :] + jnp.eye(n, dtype=unit.dtype), r)
    decrement = jnp.sqrt(jnp.maximum(r @ z, 0.0))
    # The damped step 1 / (1 + decrement) keeps alpha > 0 and converges from anywhere; |z|_inf <=
    # decrement, so full steps are safe (and quadratically convergent) once it is below 1/4.
    alpha = alpha * (1.0 - jnp.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement)) * z)
    return alpha, it + 1, jnp.max(jnp.abs(residual(alpha)))

  alpha0 = jnp.full((n,), jnp.sqrt(n / jnp.sum(unit)), unit.dtype)  # the best multiple of ones
  state = (alpha0, jnp.zeros((), jnp.int32), jnp.max(jnp.abs(residual(alpha0))))
  alpha, iterations, res = jax.lax.while_loop(
      lambda s: (s[1] < max_iterations) & (s[2] > tolerance), body, state)
  # alpha solves alpha * (G / s alpha) = 1, so alpha / sqrt(s) solves it for G.
  return alpha / jnp.sqrt(scale), {"residual": res, "solver_iterations": iterations.astype(jnp.float32)}


def nash_mtl(gram: jax.Array, max_iterations: int = 50, tolerance: float = 1e-5) -> jax.Array:
  """Nash-MTL (Navon et al. 2022): alpha > 0 with alpha_i (G alpha)_i = 1, d = sum_i alpha_i g_i.

  alpha minimises alpha^T G alpha / 2 - sum_i log alpha_i; a damped Newton method (Nesterov's
  1 / (1 + decrement) step) runs until max_i |alpha_i (G alpha)_i - 1| <= `tolerance` or for
  `max_iterations` steps (2-5 on random problems, ~20 with a zero gradient). The paper's sequence of
  convex (cvxpy) problems converges to the same point. Without an exact solution (no direction improves
  every task: a zero gradient, two opposite gradients, more conflicting tasks than dimensions), the
  regularised G gives large but finite weights to the degenerate directions, which contribute ~0 to d;
  float32 then cannot resolve the residual (the `residual` metric stays large), but d matches the
  float64 solution of the regularised problem.
  """
  return _nash(gram, max_iterations, tolerance)[0]


@gs.full_precision
def _dual_cone_projections(gram: jax.Array,
                           max_iterations: int | None = None) -> tuple[jax.Array, Metrics]:
  _check_options("upgrad", {"max_iterations": max_iterations})
  gram = gs.as_gram(gram)
  n = gram.shape[0]
  unit, _ = gs.normalized(gram)

  # v_i = e_i + u_i with u_i = argmin_{u >= 0} (e_i + u)^T G (e_i + u): an NNLS with b = -G e_i. If g_i
  # conflicts with no other gradient, b <= 0 and u_i = 0 exactly: g_i is its own projection.
  def project(i):
    u, _, iterations = gs.nnls(unit, -unit[:, i], gs.iterations(max_iterations, n))
    return u, iterations

  u, iterations = jax.vmap(project)(jnp.arange(n))
  v = jnp.eye(n, dtype=gram.dtype) + u
  return v, {"dual_cone_violation": jnp.maximum(-jnp.min(v @ unit), 0.0),  # in units of G / s
             "solver_iterations": jnp.max(iterations).astype(jnp.float32)}


def dual_cone_projections(gram: jax.Array, max_iterations: int | None = None) -> jax.Array:
  """[T, T]: row i holds the weights v_i of the projection of g_i onto the dual cone
  {x : g_j . x >= 0 for all j}, v_i = argmin_{v >= e_i} v^T G v (Quinton & Layne 2024, Prop. 1, eq. 5),
  each an exact active-set NNLS solve (at most `max_iterations` steps, default 4T + 10)."""
  return _dual_cone_projections(gram, max_iterations)[0]


def _upgrad(gram: jax.Array, max_iterations: int | None = None) -> tuple[jax.Array, Metrics]:
  if jnp.shape(gram)[0] == 1:
    _check_options("upgrad", {"max_iterations": max_iterations})
    return _one_task(gs.as_gram(gram))
  v, metrics = _dual_cone_projections(gram, max_iterations)
  return jnp.mean(v, axis=0), metrics


def upgrad(gram: jax.Array, max_iterations: int | None = None) -> jax.Array:
  """UPGrad (Quinton & Layne 2024; torchjd's default aggregator): d equals the MEAN of the projections
  of the task gradients onto their dual cone (`dual_cone_projections`), as in torchjd. With no
  conflicting pair every g_i is its own projection and d is exactly the mean gradient."""
  return _upgrad(gram, max_iterations)[0]


def _uniform(method: str, fn: Callable[..., tuple[jax.Array, Metrics]]):
  def aggregate(gram: jax.Array, key: jax.Array | None = None,
                **options: Any) -> tuple[jax.Array, Metrics]:
    _check_options(method, options)
    weights, metrics = fn(gram, key) if method == "pcgrad" else fn(gram, **options)
    conflicts = jnp.sum(jnp.triu(gs.as_gram(gram) < 0, k=1)).astype(jnp.float32)
    return weights, {"conflicting_pairs": conflicts, **metrics}
  aggregate.__name__ = aggregate.__qualname__ = method
  aggregate.__doc__ = f"{method}: `(gram [T, T], key, **options) -> (weights [T], scalar metrics)`."
  return aggregate


AGGREGATORS: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    name: _uniform(name, fn) for name, fn in [
        ("pcgrad", _pcgrad), ("mgda", _mgda), ("cagrad", _cagrad), ("imtl", _imtl),
        ("nash", _nash), ("upgrad", _upgrad)]}


def make_aggregator(name: str, **options: Any) -> Callable[..., tuple[jax.Array, Metrics]]:
  """`AGGREGATORS[name]` with `options` bound and validated now, before anything is traced."""
  if name not in AGGREGATORS:
    raise ConfigError(f"unknown aggregator {name!r}; use one of {', '.join(AGGREGATORS)}")
  _check_options(name, options)
  return functools.partial(AGGREGATORS[name], **options)


@gs.full_precision
def combine(weights: jax.Array, grads: Any) -> Any:
  """sum_t w_t g_t over the leading [T] axis of an array, or of every leaf of a pytree of them."""
  def one(g):
    g = jnp.asarray(g)
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    return jnp.tensordot(weights.astype(dtype), g.astype(dtype), axes=1).astype(g.dtype)
  return jax.tree.map(one, grads)
