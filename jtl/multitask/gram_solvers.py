"""Small solvers on a T x T Gram matrix of task gradients, shared by the aggregators
(jtl/multitask/aggregators.py): checking and normalising G, Lawson & Hanson's NNLS written on G, the
min-norm point of the simplex, and full-precision tracing. All jit and vmap (`lax.while_loop`)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

REG = 1e-6  # relative to a unit mean diagonal: above float32 rounding, far below any real signal


def as_gram(gram: jax.Array) -> jax.Array:
  gram = jax.lax.stop_gradient(jnp.asarray(gram))
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(f"gram must be a square [T, T] matrix, got shape {gram.shape}")
  gram = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
  return 0.5 * (gram + gram.T)


def normalized(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(G / s + REG I, s), s the mean diagonal; all-zero gradients give the identity (any w will do)."""
  n = gram.shape[0]
  scale = jnp.trace(gram) / n
  ok = scale > jnp.finfo(gram.dtype).tiny
  eye = jnp.eye(n, dtype=gram.dtype)
  return jnp.where(ok, gram / jnp.where(ok, scale, 1.0), eye) + REG * eye, jnp.where(ok, scale, 1.0)


def iterations(maxiterations: int | None, n: int) -> int:
  # Lawson-Hanson takes about one step per positive entry (measured: at most 1.25 T on random problems).
  return 4 * n + 10 if maxiterations is None else maxiterations


def nnls(a: jax.Array, b: jax.Array, maxiterations: int,
          passive: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """argmin_{u >= 0} u^T A u / 2 - b^T u for positive definite A: (u, passive set, iterations).

  Lawson & Hanson's active-set NNLS (Solving Least Squares Problems, 1974, ch. 23) on the normal
  equations, so it needs only A = J J^T. It is exact once the active set is right. A multiplier counts
  as positive only above the float rounding of b - A u, so noise never enters the active set. `passive`
  warm-starts from a guessed support: u = 0 and an infeasible guess shrinks until it is feasible.
  """
  n = b.shape[0]
  noise = 10 * n * jnp.finfo(a.dtype).eps

  def body(state):
    u, passive, it, _ = state
    block = passive[:, None] & passive[None, :]
    matrix = jnp.where(block, a, 0.0) + jnp.diag(jnp.where(passive, 0.0, 1.0))
    s = jnp.where(passive, jnp.linalg.solve(matrix, jnp.where(passive, b, 0.0)), 0.0)
    feasible = jnp.all(~passive | (s > 0))
    # Feasible: accept s and free the index whose multiplier most clearly wants to grow.
    violation = jnp.where(passive, -jnp.inf,
                          b - a @ s - noise * (jnp.abs(b) + jnp.abs(a) @ jnp.abs(s)))
    j = jnp.argmax(violation)
    grow = violation[j] > 0
    # Infeasible: move from u towards s until the first passive coordinate hits zero; release it.
    blocking = passive & (s <= 0)
    gap = jnp.where(blocking, u - s, 1.0)
    ratio = jnp.where(blocking, u / jnp.where(gap > 0, gap, 1.0), jnp.inf)
    step = jnp.min(ratio)
    u_step = u + jnp.where(jnp.isfinite(step), step, 0.0) * (s - u)
    release = blocking & ((ratio <= step) | (u_step <= 0))
    new_u = jnp.where(feasible, s, jnp.where(release, 0.0, jnp.maximum(u_step, 0.0)))
    new_passive = jnp.where(feasible, passive | (grow & (jnp.arange(n) == j)), passive & ~release)
    return new_u, new_passive, it + 1, feasible & ~grow

  passive = jnp.zeros(n, bool) if passive is None else passive
  state = (jnp.zeros_like(b), passive, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  u, passive, iterations, _ = jax.lax.while_loop(
      lambda s: ~s[3] & (s[2] < maxiterations), body, state)
  return u, passive, iterations


def min_norm_weights(unit: jax.Array, maxiterations: int,
                      passive: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """argmin_{w in simplex} w^T G w for a normalised, regularised G: (w, support, iterations).

  One NNLS: min_{u >= 0} |J^T u|^2 + (1 - 1^T u)^2 is solved by u* = w* / (1 + |g_w*|^2), because for
  u = s w its minimum over s is |g_w|^2 / (1 + |g_w|^2), increasing in |g_w|^2; so w* = u* / 1^T u*.
  """
  n = unit.shape[0]
  u, passive, iterations = nnls(unit + 1.0, jnp.ones(n, unit.dtype), maxiterations, passive)
  total = jnp.sum(u)
  return jnp.where(total > 0, u / jnp.where(total > 0, total, 1.0), 1.0 / n), passive, iterations


def full_precision(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Traces `fn` with float32 matmuls: JAX's default may use TF32 (GPU) or bfloat16 (TPU) passes, far
  too coarse for the cancellations in these small solves."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped
