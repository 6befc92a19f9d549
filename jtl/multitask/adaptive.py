"""Fully-adaptive feature sharing: a trunk that branches into task groups, and the helpers to widen it.

Lu, Kumar, Zhai, Cheng, Javidi & Feris, "Fully-adaptive Feature Sharing in Multi-Task Networks with
Applications in Person Attribute Classification", CVPR 2017.

Structure (`branches`, option `--config.multitask.arch_options.branches`): one grouping of the task
names per trunk stage, bottom to top, each a partition of the tasks that refines the one below, e.g. for
tasks a, b, c and 3 stages `((("a", "b", "c"),), (("a", "b", "c"),), (("a", "b"), ("c",)))`. Stage k
holds one copy of stage k of the registry trunk per group, at `params/branches/stage<k>/<group>/...`
(the group named by its tasks joined with `+`, in the order given; inside, the registry's own names,
e.g. `branches/stage2/a+b/stage2/conv/kernel`); a group's branch reads the output of the branch of the
group containing it one stage below; each task's head (`params/heads/<task>`) reads the pooled output of
its top-stage group. Every stage one group (the default) is hard sharing, the "thin" start here.

Lu et al. start thin (narrow layers, all shared) and widen top-down: the junction (the top-most stage
still shared the way the bottom one is) is split into branches by clustering the tasks (or the
branches above it) by affinity, and each new branch starts as a copy of the one it split from, so the
widened network computes the same function. The driver does the rounds with three pure helpers:
`split_top` (the new structure), `widen` (the new params and model_state from the old ones) and
`task_affinity` (from per-example errors).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import numpy as np

from jtl.errors import ConfigError
from jtl.models import stages
from jtl.multitask.tasks import Task
from jtl.multitask.trunk import Outputs, Penalties, TaskHeads

Group = tuple[str, ...]
Branches = tuple[tuple[Group, ...], ...]
_FLAG = "--config.multitask.arch_options.branches"


def group_name(group: Group) -> str:
  """A group's parameter name: its tasks joined with `+`."""
  return "+".join(group)


def check_branches(branches: Any, task_names: Sequence[str], num_stages: int) -> Branches:
  """The structure as nested tuples; ConfigError unless it is one refining partition per stage."""
  if not isinstance(branches, (tuple, list)) or len(branches) != num_stages:
    raise ConfigError(f"branches must give one grouping per trunk stage ({num_stages}), got "
                      f"{branches!r} ({_FLAG})")
  out, below = [], None
  for k, stage in enumerate(branches, start=1):
    if not isinstance(stage, (tuple, list)) or not stage:
      raise ConfigError(f"branches stage {k} must be a tuple of task groups, got {stage!r} ({_FLAG})")
    if any(not isinstance(g, (tuple, list)) for g in stage):
      raise ConfigError(f"branches stage {k} must be a tuple of groups, each a tuple of task names "
                        f"(a one-task group is ('a',)), got {stage!r} ({_FLAG})")
    groups = tuple(tuple(g) for g in stage)
    flat = [name for g in groups for name in g]
    if (any(not g for g in groups) or not all(isinstance(n, str) for n in flat)
        or sorted(flat) != sorted(task_names)):
      raise ConfigError(f"branches stage {k} must split the tasks {', '.join(task_names)} into "
                        f"non-empty groups, each task once; got {stage!r} ({_FLAG})")
    if below is not None:
      for g in groups:
        if not any(set(g) <= set(parent) for parent in below):
          raise ConfigError(f"branches stage {k}: group {g} straddles two groups of stage {k - 1}; "
                            f"each stage must refine the one below ({_FLAG})")
    out.append(groups)
    below = groups
  return tuple(out)


def _parent(group: Group, below: Sequence[Group]) -> Group:
  return next(p for p in below if set(group) <= set(p))


class StageBranches(nn.Module):
  """`stage<k>/<group>`: stage k of the trunk, one copy per group."""
  tower: stages.StagedBackbone

  @nn.compact
  def __call__(self, inputs: Mapping[Group, jax.Array], train: bool, k: int) -> dict[Group, jax.Array]:
    return {g: self.tower.clone(name=group_name(g), parent=self).stage(x, train, k)
            for g, x in inputs.items()}


class BranchStack(nn.Module):
  """`branches`: holds `stage<k>` for every stage."""
  tower: stages.StagedBackbone

  @nn.compact
  def __call__(self, inputs: Mapping[Group, jax.Array], train: bool, k: int) -> dict[Group, jax.Array]:
    return StageBranches(self.tower, name=f"stage{k}")(inputs, train, k)


class Adaptive(nn.Module):
  """The trunk branched by `branches`; tasks follow their group's path up to their heads."""
  tower: stages.StagedBackbone
  tasks: tuple[Task, ...]
  branches: Branches
  shared_representation: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[Outputs, Penalties]:
    stack = BranchStack(self.tower, name="branches")
    acts: dict[Group, jax.Array] = {}
    for k, groups in enumerate(self.branches, start=1):
      below = self.branches[k - 2] if k > 1 else None
      inputs = {g: x if below is None else acts[_parent(g, below)] for g in groups}
      acts = stack(inputs, train, k)
    top = {name: g for g in self.branches[-1] for name in g}
    features = {t.name: stages.global_pool(acts[top[t.name]]) for t in self.tasks}
    return TaskHeads(self.tasks, name="heads")(features), {}


def _widen_branches(tree: Mapping[str, Any], old: Branches, new: Branches) -> dict[str, Any]:
  out = {}
  for k, (old_groups, new_groups) in enumerate(zip(old, new), start=1):
    stage = tree[f"stage{k}"]
    out[f"stage{k}"] = {
        group_name(g): jax.tree.map(lambda v: v, stage[group_name(_parent(g, old_groups))])
        for g in new_groups}
  return out


def widen(tree: Mapping[str, Any], old_branches: Branches, new_branches: Branches) -> dict[str, Any]:
  """Params (or model_state) for `new_branches` from those of `old_branches`.

  Each group of `new_branches` at stage k starts as a copy of the old stage-k branch containing it;
  everything outside `branches` (the heads, other collections' entries) is kept. Works on a params
  tree (`{"branches": ..., "heads": ...}`) and on a model_state (`{"batch_stats": {"branches": ...}}`).
  Raises ConfigError if a new group is not inside one old group of its stage.
  """
  names = sorted(n for g in old_branches[0] for n in g)
  old = check_branches(old_branches, names, len(old_branches))
  new = check_branches(new_branches, names, len(old_branches))
  for k, (old_groups, new_groups) in enumerate(zip(old, new), start=1):
    for g in new_groups:
      if not any(set(g) <= set(p) for p in old_groups):
        raise ConfigError(f"widen: new group {g} at stage {k} is not inside one old group of "
                          f"{old_groups}; a widened structure only splits groups")

  def visit(node: Any) -> Any:
    if not isinstance(node, Mapping):
      return node
    return {key: _widen_branches(value, old, new) if key == "branches" else visit(value)
            for key, value in node.items()}
  return visit(tree)


def task_affinity(per_task_errors: Any, threshold: str = "mean") -> np.ndarray:
  """Lu et al.'s task affinity [T, T] from per-example errors [N, T] (e.g. per-example losses).

  An example is "hard" for task i if its error is at or above the task's `threshold` ("mean", Lu et
  al.'s choice, or "median") over the N examples, and "easy" otherwise. A[i, j] is the probability that
  an example is easy for both or hard for both: mean_n(e_i e_j + (1 - e_i)(1 - e_j)), so A is symmetric
  with ones on the diagonal, 1 for tasks with the same easy/hard split and 0 for opposite ones.
  """
  errors = np.asarray(per_task_errors, np.float64)
  if errors.ndim != 2:
    raise ValueError(f"per_task_errors must be [N, T], got shape {errors.shape}")
  if threshold not in ("mean", "median"):
    raise ValueError(f"threshold must be 'mean' or 'median', got {threshold!r}")
  cut = errors.mean(axis=0) if threshold == "mean" else np.median(errors, axis=0)
  hard = (errors >= cut).astype(np.float64)
  return (hard.T @ hard + (1.0 - hard).T @ (1.0 - hard)) / errors.shape[0]


def _cluster(units: list[Group], affinity: np.ndarray, index: dict[str, int], num_groups: int
             ) -> list[Group]:
  # Greedy agglomerative clustering with average linkage: merge the two clusters whose tasks have the
  # highest mean pairwise affinity (ties: the earliest pair in order) until num_groups remain.
  clusters = [list(u) for u in units]
  while len(clusters) > max(num_groups, 1):
    best, pair = -np.inf, (0, 1)
    for i in range(len(clusters)):
      for j in range(i + 1, len(clusters)):
        link = np.mean([affinity[index[a], index[b]] for a in clusters[i] for b in clusters[j]])
        if link > best:
          best, pair = link, (i, j)
    i, j = pair
    clusters[i] = clusters[i] + clusters.pop(j)
  return [tuple(sorted(c, key=index.__getitem__)) for c in clusters]


def split_top(branches: Branches, affinity: Any, num_groups: int,
              task_names: Sequence[str] | None = None) -> Branches:
  """One widening round: splits the junction stage into at most `num_groups` branches per group.

  The junction is the top-most stage s that is still shared the way the bottom stage is (stages
  1..s have the same grouping; s = the top stage for hard sharing). Each group of stage s is split by
  clustering its children, the groups of stage s + 1 inside it (the single tasks when s is the top), into
  min(num_groups, #children) clusters with greedy agglomerative clustering under average linkage on
  `affinity` (the mean affinity over task pairs across two clusters; the most affine pair merges first,
  ties to the earlier pair). Tasks in a group and groups in a stage are ordered by `task_names` (the
  order of `affinity`'s rows; default: the bottom stage's tasks in order). Returns `branches` unchanged
  when the junction has nothing to split (every stage one task per group). Repeated rounds move the
  junction one stage down each time, as in Lu et al.; a top-down pass over K stages is K rounds.
  """
  if task_names is None:
    task_names = [n for g in branches[0] for n in g]
  index = {name: i for i, name in enumerate(task_names)}
  branches = check_branches(branches, list(task_names), len(branches))
  affinity = np.asarray(affinity, np.float64)
  if affinity.shape != (len(index), len(index)):
    raise ValueError(f"affinity must be [T, T] = {len(index)} tasks square, got {affinity.shape}")
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
  def grouping(stage: Sequence[Group]) -> frozenset:
    return frozenset(frozenset(g) for g in stage)

  junction = 0
  while junction + 1 < len(branches) and grouping(branches[junction + 1]) == grouping(branches[0]):
    junction += 1
  above = branches[junction + 1] if junction + 1 < len(branches) else tuple((n,) for n in task_names)
  children = {g: [c for c in above if set(c) <= set(g)] for g in branches[junction]}
  if all(len(c) == 1 for c in children.values()):
    return branches
  groups = [cluster for g in branches[junction]
            for cluster in _cluster(children[g], affinity, index, num_groups)]
  groups.sort(key=lambda g: index[g[0]])
  return branches[:junction] + (tuple(groups),) + branches[junction + 1:]
