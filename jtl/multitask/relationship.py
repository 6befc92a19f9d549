"""Multilinear relationship network: task-specific layers tied by a tensor normal prior.

Long, Cao, Wang & Yu, "Learning Multiple Tasks with Multilinear Relationship Networks", NeurIPS 2017
(MRN: the tensor normal prior over the stacked task-specific weights, its MAP objective and the
flip-flop updates of the covariances); Long & Wang, "Learning Multiple Tasks with Deep Relationship
Networks", 2015 (the matrix-variate predecessor).

Layout:
  params/backbone/...                the registry backbone shared by all tasks (as in `hard`)
  params/relationship/layer<l>/kernel  [T, D_in, D_out], the T task-specific Dense layers of layer l
  params/relationship/layer<l>/bias    [T, D_out]; each layer is followed by a relu
  params/heads/<task>/...            the task heads, on the last task-specific layer
  relationship/relationship/layer<l>/cov_in, cov_out, cov_task   the covariances (collection
                                     `relationship`, model state, not trained)
  relationship/relationship/count    train calls so far (int32)

Prior: the stacked kernel read as W [D_in, D_out, T] (W[i, j, t] = kernel[t, i, j]) has the tensor
normal prior TN(0, S_in, S_out, S_task); its negative log density, up to terms without W, gives
  penalty = weight * 1/2 * vec(W)^T (S_in (x) S_out (x) S_task)^{-1} vec(W)
          = weight * 1/2 * <W, W x_1 S_in^{-1} x_2 S_out^{-1} x_3 S_task^{-1}>
with vec the row-major (C-order) flattening, for which the Kronecker factors come in this order.
It is computed with mode products, never forming the Kronecker product. The log-determinant terms of
the prior do not depend on W and are left out. The heads are not under the prior (their widths differ
per task, so they do not stack).

Covariances (MRN's flip-flop, one sweep per update, each factor from the newest others):
  S_k <- (1 - eps) * D_k * M_k / tr(M_k) + eps * I,
  M_k = W_(k) (S_a (x) S_b)^{-1} W_(k)^T / (D_a D_b)   (a, b the other two modes, row-major order)
computed from stop_gradient(W). The maximum-likelihood estimate M_k is normalised to trace D_k because
the Kronecker factorisation is only defined up to scales that cancel (c S_in (x) S_out / c); D_k is the
trace of the starting value, the identity, so the penalty starts as weight/2 * ||W||^2 and keeps that
scale, and `weight` alone sets it (the authors' code normalises each factor's trace too). `eps` shrinks
towards identity (the paper's ridge eps * I), bounding the precision's eigenvalues by 1/eps. A train
call (train=True, outside init) re-estimates the covariances when `count % cov_update_every == 0`, then
counts itself; the penalty of that call uses the new estimate. Evaluation only reads them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.multitask.tasks import Task
from jtl.multitask.trunk import Penalties, TaskHeads, TwoPart

_HIGHEST = jax.lax.Precision.HIGHEST
Covariances = tuple[jax.Array, jax.Array, jax.Array]  # (S_in, S_out, S_task)


def spd_inverse(matrix: jax.Array) -> jax.Array:
  """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
  factor = jax.scipy.linalg.cho_factor(matrix, lower=True)
  return jax.scipy.linalg.cho_solve(factor, jnp.eye(matrix.shape[0], dtype=matrix.dtype))


def quadratic_form(w: jax.Array, precisions: Covariances) -> jax.Array:
  """<W, W x_1 P_in x_2 P_out x_3 P_task> = vec(W)^T (P_in (x) P_out (x) P_task) vec(W).

  W is [D_in, D_out, T] and vec its row-major flattening; the Kronecker product is never formed.
  """
  p_in, p_out, p_task = precisions
  v = jnp.einsum("ia,ajt->ijt", p_in, w, precision=_HIGHEST)
  v = jnp.einsum("jb,ibt->ijt", p_out, v, precision=_HIGHEST)
  v = jnp.einsum("tc,ijc->ijt", p_task, v, precision=_HIGHEST)
  return jnp.sum(w * v)


def _normalised(moment: jax.Array, eps: float) -> jax.Array:
  dim = moment.shape[0]
  trace = jnp.trace(moment)
  # A zero moment (all-zero weights) has no direction to estimate: keep the identity.
  scaled = jnp.where(trace > 1e-30, dim * moment / jnp.maximum(trace, 1e-30), jnp.eye(dim))
  return (1.0 - eps) * scaled + eps * jnp.eye(dim)


def flip_flop(w: jax.Array, covariances: Covariances, eps: float) -> Covariances:
  """One flip-flop sweep over (S_in, S_out, S_task) for W [D_in, D_out, T] (see the module docstring)."""
  d_in, d_out, d_task = w.shape
  _, s_out, s_task = covariances
  p_out, p_task = spd_inverse(s_out), spd_inverse(s_task)
  v = jnp.einsum("ijt,jb,tc->ibc", w, p_out, p_task, precision=_HIGHEST)
  s_in = _normalised(jnp.einsum("ibc,abc->ia", v, w, precision=_HIGHEST) / (d_out * d_task), eps)
  p_in = spd_inverse(s_in)
  v = jnp.einsum("ijt,ia,tc->ajc", w, p_in, p_task, precision=_HIGHEST)
  s_out = _normalised(jnp.einsum("ajc,akc->jk", v, w, precision=_HIGHEST) / (d_in * d_task), eps)
  p_out = spd_inverse(s_out)
  v = jnp.einsum("ijt,ia,jb->abt", w, p_in, p_out, precision=_HIGHEST)
  s_task = _normalised(jnp.einsum("abt,abs->ts", v, w, precision=_HIGHEST) / (d_in * d_out), eps)
  return s_in, s_out, s_task


class StackedDense(nn.Module):
  """`layer<l>`: T Dense layers as one [T, D_in, D_out] kernel and [T, D_out] bias, plus covariances."""
  num_tasks: int
  features: int

  @nn.compact
  def __call__(self, h: jax.Array, update: jax.Array | None, eps: float
               ) -> tuple[jax.Array, jax.Array]:
    """[T, B, D_in] -> relu(h_t W_t + b_t) [T, B, D_out], and the layer's quadratic form."""
    d_in = h.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                        (self.num_tasks, d_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.num_tasks, self.features))
    shapes = {"cov_in": d_in, "cov_out": self.features, "cov_task": self.num_tasks}
    covs = {k: self.variable("relationship", k, lambda n=n: jnp.eye(n, dtype=jnp.float32))
            for k, n in shapes.items()}
    w = jnp.transpose(kernel, (1, 2, 0)).astype(jnp.float32)  # [D_in, D_out, T]
    current = tuple(covs[k].value for k in shapes)
    if update is not None:
      current = jax.lax.cond(update, lambda c: flip_flop(jax.lax.stop_gradient(w), c, eps),
                             lambda c: c, current)
      for k, value in zip(shapes, current):
        covs[k].value = value
    precisions = tuple(spd_inverse(jax.lax.stop_gradient(c)) for c in current)
    out = jnp.einsum("tbi,tio->tbo", h, kernel) + bias[:, None, :]
    return nn.relu(out), quadratic_form(w, precisions)


class RelationshipLayers(nn.Module):
  """`relationship/layer<l>` for l < len(widths), the covariance update schedule and the penalty."""
  num_tasks: int
  widths: tuple[int, ...]
  weight: float
  eps: float
  cov_update_every: int

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    count = self.variable("relationship", "count", lambda: jnp.zeros((), jnp.int32))
    update = None
    if train and not self.is_initializing():
      update = count.value % self.cov_update_every == 0
      count.value = count.value + 1
    h = jnp.broadcast_to(z, (self.num_tasks, *z.shape))
    total = jnp.zeros((), jnp.float32)
    for layer, width in enumerate(self.widths):
      h, form = StackedDense(self.num_tasks, width, name=f"layer{layer}")(h, update, self.eps)
      total += form
    return h, self.weight * 0.5 * total


class Relationship(TwoPart):
  """Shared registry backbone, `task_layers` MRN layers per task, then the heads. z = the shared
  backbone's pooled features [B, D] (the task-specific layers are in `heads`, whose train calls may
  update the covariances); the penalty is the prior's."""
  backbone: nn.Module
  tasks: tuple[Task, ...]
  task_layers: int = 1
  width: int | None = None
  weight: float = 1e-3
  eps: float = 1e-2
  cov_update_every: int = 1

  @nn.compact
  def _run(self, x: jax.Array, train: bool, part: str) -> tuple[Any, Penalties]:
    if part != "heads":
      x = self.backbone(x, train=train).astype(jnp.float32)
      if part == "features":
        return x, {}
    widths = (self.width or x.shape[-1],) * self.task_layers
    layers = RelationshipLayers(len(self.tasks), widths, self.weight, self.eps, self.cov_update_every,
                                name="relationship")
    h, penalty = layers(x, train)
    outputs = TaskHeads(self.tasks, name="heads")({t.name: h[i] for i, t in enumerate(self.tasks)})
    return outputs, {"relationship": penalty}
