"""Domain adaptation losses on features: the gradient reversal layer, Deep CORAL and (multi-kernel) MMD.

Conventions (as the other modules of `jtl.losses`):
- Features are [N, D] arrays of any float dtype, computed in float32 with full-precision matmuls
  (`Precision.HIGHEST`: on accelerators the default bf16 passes would swamp these small differences).
- The discrepancies return one scalar for the two batches (they are statistics of the batches, not
  sums over examples), and are symmetric in (source, target).
- Under `jit` over a Mesh the inputs are global arrays: the statistics are over the global batch,
  exactly, with XLA inserting the collectives.

References
- Gradient reversal: Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks" (JMLR),
  Sec. 3.2: R(x) = x forward, dR/dx = -lambda I backward; the schedule of its experiments (Sec. 5.2.2)
  lambda_p = 2 / (1 + exp(-gamma p)) - 1, gamma = 10, p = training progress in [0, 1].
- Deep CORAL: Sun & Saenko 2016, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", eq. 1
  (loss ||C_S - C_T||_F^2 / (4 d^2)) and eq. 2-3 (C = (X^T X - (1^T X)^T (1^T X) / n) / (n - 1), i.e.
  the unbiased covariance; computed here from centred features, which is the same matrix without the
  cancellation of the raw-moment form).
- MMD: Gretton et al. 2012, "A Kernel Two-Sample Test" (JMLR), the squared MMD in a Gaussian RKHS:
  `biased` is the V-statistic MMD_b^2 = mean K_ss + mean K_tt - 2 mean K_st (>= 0, exactly 0 for
  identical batches); `unbiased` the U-statistic MMD_u^2, which drops the i = j terms of K_ss and
  K_tt (unbiased, may be < 0). The kernel is a sum of Gaussians exp(-||x - y||^2 / s_k) over a family
  of bandwidths (multi-kernel MMD, Long et al. 2015, "Learning Transferable Features with Deep
  Adaptation Networks", with fixed equal weights): s_k = m_k * mean pairwise squared distance of the
  pooled batch (held constant: `stop_gradient`), or fixed `scales`.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

MMD_ESTIMATORS = ("biased", "unbiased")
DEFAULT_MMD_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
_HIGHEST = jax.lax.Precision.HIGHEST
_MIN_SCALE = 1e-12  # smallest data-dependent MMD bandwidth (squared-distance units)


@jax.custom_vjp
def gradient_reversal(x: jax.Array, lam: jax.Array | float) -> jax.Array:
  """Identity forward; backward multiplies the cotangent by -lam. `lam` gets a zero cotangent (it is a
  schedule value, not something to learn), so no gradient ever flows into it."""
  return x


def _reversal_fwd(x, lam):
  return x, lam


def _reversal_bwd(lam, g):
  lam = jnp.asarray(lam)
  return (-lam.astype(g.dtype) * g, jnp.zeros_like(lam))


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


def dann_lambda(progress: jax.Array | float, gamma: float = 10.0) -> jax.Array:
  """lambda_p = 2 / (1 + exp(-gamma p)) - 1 for progress p (clipped to [0, 1]); 0 at p = 0, -> 1.

  Written as tanh(gamma p / 2), the same function without exp overflow for any gamma.
  """
  p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  return jnp.tanh(0.5 * gamma * p)


def covariance(features: jax.Array) -> jax.Array:
  """Unbiased covariance [D, D] of features [N, D] (N >= 2), from centred features."""
  x = features.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=0, keepdims=True)
  return jnp.matmul(centred.T, centred, precision=_HIGHEST) / (x.shape[0] - 1)


def coral(source: jax.Array, target: jax.Array) -> jax.Array:
  """Deep CORAL loss ||C_s - C_t||_F^2 / (4 d^2) of features [N_s, d] and [N_t, d] (eq. 1)."""
  if source.shape[-1] != target.shape[-1]:
    raise ValueError(f"coral: feature dims differ, {source.shape} vs {target.shape}")
  d = source.shape[-1]
  diff = covariance(source) - covariance(target)
  return jnp.sum(jnp.square(diff)) / (4.0 * d * d)


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """||x_i - y_j||^2 as [N, M], clipped at 0 (the expanded form can round below it)."""
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  cross = jnp.matmul(x, y.T, precision=_HIGHEST)
  d2 = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * cross
  return jnp.maximum(d2, 0.0)


def mmd(source: jax.Array, target: jax.Array, *, estimator: str = "biased",
        multipliers: Sequence[float] = DEFAULT_MMD_MULTIPLIERS,
        scales: Sequence[float] | None = None) -> jax.Array:
  """Squared multi-kernel MMD between feature batches [N_s, D] and [N_t, D].

  Kernel k(x, y) = sum_k exp(-||x - y||^2 / s_k). `scales` gives the s_k directly; otherwise
  s_k = multipliers[k] * (mean squared distance over distinct pairs of the pooled batch), a
  data-dependent bandwidth held constant in the gradient. `estimator`: 'biased' (V-statistic) or
  'unbiased' (U-statistic; needs N_s, N_t >= 2).
  """
  if estimator not in MMD_ESTIMATORS:
    raise ValueError(f"mmd: unknown estimator {estimator!r}; choose one of {MMD_ESTIMATORS}")
  n, m = source.shape[0], target.shape[0]
  pooled = jnp.concatenate([source.astype(jnp.float32), target.astype(jnp.float32)])
  d2 = squared_distances(pooled, pooled)
  if scales is None:
    total = n + m
    base = jax.lax.stop_gradient(jnp.sum(d2) / (total * (total - 1)))
    # All-equal features (e.g. dead ReLUs) give base 0: a floor keeps 1/s and its gradient finite.
    base = jnp.maximum(base, _MIN_SCALE)
    scale_values = [base * float(mult) for mult in multipliers]
  else:
    scale_values = [jnp.asarray(float(s), jnp.float32) for s in scales]
  kernel = sum(jnp.exp(-d2 / s) for s in scale_values)
  k_ss, k_tt, k_st = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
  if estimator == "biased":
    return jnp.mean(k_ss) + jnp.mean(k_tt) - 2.0 * jnp.mean(k_st)
  off_ss = (jnp.sum(k_ss) - jnp.trace(k_ss)) / (n * (n - 1))
  off_tt = (jnp.sum(k_tt) - jnp.trace(k_tt)) / (m * (m - 1))
  return off_ss + off_tt - 2.0 * jnp.mean(k_st)
