"""Multitask networks with one tower per task: soft sharing, cross-stitch and sluice networks.

Every tower is a copy of the registry backbone (its structure and names) at `params/towers/<task>/...`,
so `params/towers/a/stage2/conv/kernel` is `params/backbone/stage2/conv/kernel` of a single-task
model; heads at `params/heads/<task>`; the units that mix towers at `params/cross_stitch/...` and
`params/sluice/...`, so `optim.lr_mults` can give them their own learning rate (Misra et al. use a
much larger one for them). None of these archs has one shared representation
(`shared_representation = False`).

soft_l2 (Duong et al., "Low resource dependency parsing: cross-lingual parameter sharing in a neural
network parser", ACL 2015): penalty `weight * sum_{i<j} sum_leaves ||W_i - W_j||_F^2` over the tower
leaves the `leaves` rule table selects (patterns fullmatch a path inside a tower, e.g.
`stage2/conv/kernel`; default: every kernel). No 1/2, no averaging over pairs or leaves; it is computed
in O(T) as `T sum_t ||D_t||^2 - ||sum_t D_t||^2`, D_t = W_t - W_1 (the same number, exactly 0 for
equal towers).

soft_trace (Yang & Hospedales, "Trace norm regularised deep multi-task learning", ICLR-W 2017):
penalty `weight * sum_leaves ||[vec W_1, ..., vec W_T]||_*`, the nuclear norm of the leaves stacked
along a new last (task) axis and unfolded to [prod(leaf shape), T], the paper's "last axis flattening".
This unfolding is the one whose rank counts how many independent weight vectors the T tasks use:
rank 1 means every task's leaf is a multiple of one shared leaf (hard sharing up to scale), rank T
means no sharing, and its singular values are those of the T x T Gram matrix of the tasks' leaves. The
SVD is `jnp.linalg.svd(compute_uv=False)`, whose JVP (diag(U^T dW V)) stays finite at the zero singular
values of equal towers.

cross_stitch (Misra et al., "Cross-stitch networks for multi-task learning", CVPR 2016, eq. 1): the
towers run stage by stage (`jtl.models.stages`); after each stage in `stitch_after` (default: all) the
activations are mixed, x'_t = sum_s alpha[t, s] x_s, with alpha [T, T] (`granularity=scalar`) or
[T, T, C] (`channel`, one mixing per channel), initialised to `init_diagonal` (0.9) on the diagonal and
(1 - init_diagonal) / (T - 1) off it (the paper's 0.9 / 0.1 for T = 2; a single task's unit is 1).

sluice (Ruder et al., "Latent multi-task architecture learning", AAAI 2019): stage outputs of
C channels are split into `subspaces` M contiguous channel groups G_{t,m} (C/M channels each); after
every stage alpha_k [T*M, T*M] mixes all towers' subspaces (row and column (t, m) = t*M + m):
G'_{t,m} = sum_{s,n} alpha_k[(t,m), (s,n)] G_{s,n}; the mixed output feeds the next stage. alpha is
initialised row-stochastic with `alpha_diagonal` (0.9) on the diagonal, the rest spread evenly (the
authors' "imbalanced" scheme; 1.0 gives the identity). Task t's representation is
sum_k beta[t, k] pool(G'_{t,k}), each stage's mixed output globally pooled to [B, C_k] and zero-padded to
the widest stage's width (parameter-free, so beta alone decides how much of each stage reaches the
head); beta [T, K] starts at `beta_top` (1.0) on the top stage and the rest spread evenly (one-hot on
the top by default; the authors' code uses 0.9). Penalty (the paper's subspace orthogonality constraint):
`weight * sum_t sum_k sum_{m<n} ||G_{t,k,m}^T G_{t,k,n}||_F^2`, on the stage outputs before mixing,
G as [N, C/M] matrices whose N = B*H*W rows are the positions; with `orthogonality_rows=mean` (default)
each product is divided by N (so the penalty does not grow with batch and image size; `sum` is the
paper's unnormalised equation).
Reductions: alpha = I and beta one-hot on the top are T independent towers with heads; alpha with
entries delta_{mn} / T (every subspace averaged over the tasks) feeds all towers the same input at
every stage, which with equal tower weights is exactly hard sharing; M = 1 makes alpha a cross-stitch
unit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl import masks
from jtl.models import stages
from jtl.models.stages import global_pool
from jtl.multitask.tasks import Task
from jtl.multitask.trunk import Outputs, Penalties, TaskHeads

_HIGHEST = jax.lax.Precision.HIGHEST


class Towers(nn.Module):
  """`towers/<name>`: one copy of `tower` per name; whole (`k=None`, same input) or stage k of each."""
  tower: nn.Module
  names: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Any, train: bool, k: int | None = None) -> dict[str, jax.Array]:
    copies = {name: self.tower.clone(name=name, parent=self) for name in self.names}
    if k is None:
      return {name: tower(x, train=train) for name, tower in copies.items()}
    return {name: tower.stage(x[name], train, k) for name, tower in copies.items()}


def stochastic_init(diagonal: float, shape: Sequence[int]) -> jax.Array:
  """An [n, n, ...] mixing matrix: `diagonal` on the diagonal, (1 - diagonal) / (n - 1) elsewhere."""
  n = shape[0]
  off = (1.0 - diagonal) / (n - 1) if n > 1 else 0.0
  matrix = jnp.full((n, n), off, jnp.float32) + (diagonal - off if n > 1 else 1.0) * jnp.eye(n)
  return jnp.broadcast_to(matrix.reshape(n, n, *([1] * (len(shape) - 2))), tuple(shape))


def tower_penalty(tower_params: Mapping[str, Any], names: Sequence[str], leaves: Any,
                  kind: str) -> jax.Array:
  """`sum_leaves sum_{i<j} ||W_i - W_j||^2` (kind "l2") or the task-unfolding nuclear norm ("trace")."""
  labels = masks.match(tower_params[names[0]], leaves, prefix="",
                       what="multitask.arch_options.leaves rule")
  per_task = [jax.tree.leaves(tower_params[name]) for name in names]
  total = jnp.zeros((), jnp.float32)
  for i, selected in enumerate(jax.tree.leaves(labels)):
    if not selected:
      continue
    stack = jnp.stack([leaves_t[i].astype(jnp.float32).reshape(-1) for leaves_t in per_task])  # [T, N]
    if kind == "l2":
      # sum_{i<j} ||W_i - W_j||^2 = T sum_i ||D_i||^2 - ||sum_i D_i||^2 with D_i = W_i - W_1: O(T),
      # and exactly 0 for equal towers (a mean would leave rounding residue).
      diffs = stack - stack[0]
      pairs = len(names) * jnp.sum(jnp.square(diffs)) - jnp.sum(jnp.square(jnp.sum(diffs, axis=0)))
      total += jnp.maximum(pairs, 0.0)
    else:
      total += jnp.sum(jnp.linalg.svd(stack.T, compute_uv=False))
  return total


class SoftSharing(nn.Module):
  """One registry backbone per task; an L2 (`penalty="l2"`) or trace-norm (`"trace"`) coupling."""
  tower: nn.Module
  tasks: tuple[Task, ...]
  penalty: str
  weight: float
  leaves: tuple[tuple[str, bool], ...]
  shared_representation: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[Outputs, Penalties]:
    names = tuple(t.name for t in self.tasks)
    towers = Towers(self.tower, names, name="towers")
    features = towers(x, train)
    coupling = tower_penalty(towers.variables["params"], names, self.leaves, self.penalty)
    key = "soft_l2" if self.penalty == "l2" else "trace_norm"
    return TaskHeads(self.tasks, name="heads")(features), {key: self.weight * coupling}


class CrossStitchUnits(nn.Module):
  """`cross_stitch/stage<k>`: the alpha of the unit after stage k, [T, T] or [T, T, C_k]."""
  num_tasks: int
  widths: tuple[tuple[int, int], ...]  # (stage k, its channels) for the stages that have a unit
  granularity: str
  init_diagonal: float

  def setup(self):
    shapes = {k: (self.num_tasks, self.num_tasks) + ((c,) if self.granularity == "channel" else ())
              for k, c in self.widths}
    self.alphas = {k: self.param(f"stage{k}", lambda _, s: stochastic_init(self.init_diagonal, s), s)
                   for k, s in shapes.items()}

  def __call__(self, stacked: jax.Array, k: int) -> jax.Array:
    """[T, B, ..., C] -> x'_t = sum_s alpha[t, s] x_s (per channel for `channel`)."""
    alpha = self.alphas[k].astype(stacked.dtype)
    if alpha.ndim == 2:
      return jnp.einsum("ts,s...->t...", alpha, stacked)
    return jnp.einsum("tsc,s...c->t...c", alpha, stacked)


class CrossStitch(nn.Module):
  """Towers run stage by stage with cross-stitch units after the stages in `stitch_after`."""
  tower: stages.StagedBackbone
  tasks: tuple[Task, ...]
  stitch_after: tuple[int, ...]
  granularity: str = "scalar"
  init_diagonal: float = 0.9
  shared_representation: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[Outputs, Penalties]:
    names = tuple(t.name for t in self.tasks)
    towers = Towers(self.tower, names, name="towers")
    widths = tuple((k, self.tower.stage_widths[k - 1]) for k in self.stitch_after)
    units = CrossStitchUnits(len(names), widths, self.granularity, self.init_diagonal,
                             name="cross_stitch")
    xs = {name: x for name in names}
    for k in range(1, self.tower.num_stages + 1):
      xs = towers(xs, train, k)
      if k in self.stitch_after:
        mixed = units(jnp.stack([xs[name] for name in names]), k)
        xs = dict(zip(names, mixed))
    return TaskHeads(self.tasks, name="heads")({n: global_pool(v) for n, v in xs.items()}), {}


class SluiceUnits(nn.Module):
  """`sluice/alpha_stage<k>` [T*M, T*M] for every stage and `sluice/beta` [T, K]."""
  num_tasks: int
  subspaces: int
  num_stages: int
  alpha_diagonal: float
  beta_top: float

  def setup(self):
    n = self.num_tasks * self.subspaces
    self.alphas = {k: self.param(f"alpha_stage{k}",
                                 lambda _, s: stochastic_init(self.alpha_diagonal, s), (n, n))
                   for k in range(1, self.num_stages + 1)}
    self.beta = self.param("beta", lambda _, s: _top_heavy(self.beta_top, s), (self.num_tasks,
                                                                              self.num_stages))

  def __call__(self, stacked: jax.Array, k: int) -> jax.Array:
    """Mixes the subspaces of [T, B, ..., C] with alpha_k (subspace m = channels m*C/M..(m+1)*C/M)."""
    t, m, c = self.num_tasks, self.subspaces, stacked.shape[-1]
    middle = stacked.shape[1:-1]
    split = jnp.moveaxis(stacked.reshape(t, *middle, m, c // m), -2, 1).reshape(t * m, *middle, c // m)
    mixed = jnp.einsum("ij,j...->i...", self.alphas[k].astype(stacked.dtype), split)
    return jnp.moveaxis(mixed.reshape(t, m, *middle, c // m), 1, -2).reshape(stacked.shape)


def _top_heavy(top: float, shape: Sequence[int]) -> jax.Array:
  """[T, K] rows with `top` on the last column and (1 - top) / (K - 1) on the others."""
  num_tasks, num_stages = shape
  if num_stages == 1:
    return jnp.ones(shape, jnp.float32)
  row = jnp.full((num_stages,), (1.0 - top) / (num_stages - 1), jnp.float32).at[-1].set(top)
  return jnp.broadcast_to(row, shape)


def orthogonality(stacked: jax.Array, subspaces: int, rows: str) -> jax.Array:
  """`sum_t sum_{m<n} ||G_{t,m}^T G_{t,n}||_F^2` of [T, B, ..., C] split into `subspaces` groups."""
  t, c = stacked.shape[0], stacked.shape[-1]
  groups = stacked.astype(jnp.float32).reshape(t, -1, subspaces, c // subspaces)  # [T, N, M, C/M]
  scale = 1.0 / groups.shape[1] if rows == "mean" else 1.0
  total = jnp.zeros((), jnp.float32)
  for m in range(subspaces):
    for n in range(m + 1, subspaces):
      cross = jnp.einsum("trc,trd->tcd", groups[:, :, m], groups[:, :, n], precision=_HIGHEST)
      total += jnp.sum(jnp.square(cross * scale))
  return total


class Sluice(nn.Module):
  """Towers with alpha-mixed subspaces after every stage, beta-mixed stages, orthogonal subspaces."""
  tower: stages.StagedBackbone
  tasks: tuple[Task, ...]
  subspaces: int = 2
  weight: float = 1e-3
  alpha_diagonal: float = 0.9
  beta_top: float = 1.0
  orthogonality_rows: str = "mean"
  shared_representation: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[Outputs, Penalties]:
    names = tuple(t.name for t in self.tasks)
    num_stages, width = self.tower.num_stages, max(self.tower.stage_widths)
    towers = Towers(self.tower, names, name="towers")
    units = SluiceUnits(len(names), self.subspaces, num_stages, self.alpha_diagonal, self.beta_top,
                        name="sluice")
    xs, pooled, penalty = {name: x for name in names}, [], jnp.zeros((), jnp.float32)
    for k in range(1, num_stages + 1):
      xs = towers(xs, train, k)
      stacked = jnp.stack([xs[name] for name in names])  # [T, B, ..., C_k]
      penalty += orthogonality(stacked, self.subspaces, self.orthogonality_rows)
      mixed = units(stacked, k)
      xs = dict(zip(names, mixed))
      stage_features = jax.vmap(global_pool)(mixed).astype(jnp.float32)  # [T, B, C_k]
      pad = width - stage_features.shape[-1]
      pooled.append(jnp.pad(stage_features, ((0, 0), (0, 0), (0, pad))))
    representation = jnp.einsum("tk,ktbc->tbc", units.beta, jnp.stack(pooled))
    outputs = TaskHeads(self.tasks, name="heads")(dict(zip(names, representation)))
    return outputs, {"orthogonality": self.weight * penalty}
