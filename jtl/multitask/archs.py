"""Multitask sharing architectures: `build(arch, tasks, model_config, options)` -> a linen module.

  module = build(config.multitask.arch, tasks, config.model, config.multitask.arch_options)
  variables = module.init(rng, x, train=False)     # {"params": ..., "batch_stats"?, "relationship"?}
  (outputs, penalties), state = module.apply(variables, x, train=True, mutable=[...model_state keys])

`outputs = {task: [B, num_outputs]}` are pre-activation float32; `penalties = {name: scalar}` are
regularisers already multiplied by their weights, added to the loss as they are ({} if none). Every
non-parameter variable is in a flax collection (`batch_stats`, `relationship`), i.e. model_state.
Modules with `shared_representation = True` also have `features(x, train) -> (z, penalties)` and
`heads(z, train) -> (outputs, penalties)` with `__call__ == heads . features` (penalties merged).

  arch             module                              shared_representation  trunk
  hard             trunk.HardSharing                   True (z [B, D])        any registry model
  soft_l2          towers.SoftSharing(penalty="l2")    False                  any registry model
  soft_trace       towers.SoftSharing(penalty="trace") False                  any registry model
  cross_stitch     towers.CrossStitch                  False                  staged model
  sluice           towers.Sluice                       False                  staged model
  relationship     relationship.Relationship           True (z [B, D])        any registry model
  low_supervision  trunk.LowSupervision                True (z {stage<k>: })  staged model
  adaptive         adaptive.Adaptive                   False                  staged model

Parameter paths: `params/backbone/...` (a trunk shared by all tasks, with the registry's names, so a
`hard` checkpoint initialises a single-task run and vice versa), `params/towers/<task>/...` (one copy
of the registry backbone per task), `params/heads/<task>/...` (zero-initialised `nn.Dense`),
`params/cross_stitch/...`, `params/sluice/...`, `params/relationship/...`, `params/branches/...`,
`params/label_embeddings/...`. Staged models: `jtl.models.stages`. Each arch's module documents its
paper, equations and conventions.

Options (`arch_options(arch)` lists them with their defaults; None takes the default, so options left
from another arch can be dropped with `=None`; an unknown option or a bad value is a ConfigError
naming `--config.multitask.arch_options.KEY`):
  soft_l2, soft_trace  weight (1e-3), leaves (rule table over paths inside a tower; default kernels)
  cross_stitch         stitch_after (None: after every stage; else stage numbers), granularity
                       (scalar | channel), init_diagonal (0.9)
  sluice               subspaces (2), weight (1e-3, orthogonality), alpha_diagonal (0.9), beta_top
                       (1.0), orthogonality_rows (mean | sum)
  relationship         task_layers (1), width (None: the trunk's feature width), weight (1e-3),
                       eps (1e-2), cov_update_every (1)
  low_supervision      shortcut (probs | embedding | none), embedding_dim (16); per task `depth`
  adaptive             branches (None: every stage one group of all tasks, i.e. hard sharing)
A task's `depth` is read by low_supervision only.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from jtl import masks
from jtl.config import check_number, check_positive_int
from jtl.errors import ConfigError
from jtl.models import registry, stages
from jtl.multitask import adaptive, relationship, towers, trunk
from jtl.multitask.adaptive import split_top, task_affinity, widen  # noqa: F401  (driver helpers)
from jtl.multitask.tasks import Task
from jtl.multitask.trunk import shared_prefixes  # noqa: F401  (objective helper)

ARCHS = ("hard", "soft_l2", "soft_trace", "cross_stitch", "sluice", "relationship", "low_supervision",
         "adaptive")
STAGED_ARCHS = ("cross_stitch", "sluice", "low_supervision", "adaptive")
KERNELS = ((r"(.*/)?kernel", True), (".*", False))  # the soft-sharing default: every kernel
_DEFAULTS: dict[str, dict[str, Any]] = {
    "hard": {},
    "soft_l2": dict(weight=1e-3, leaves=KERNELS),
    "soft_trace": dict(weight=1e-3, leaves=KERNELS),
    "cross_stitch": dict(stitch_after=None, granularity="scalar", init_diagonal=0.9),
    "sluice": dict(subspaces=2, weight=1e-3, alpha_diagonal=0.9, beta_top=1.0,
                   orthogonality_rows="mean"),
    "relationship": dict(task_layers=1, width=None, weight=1e-3, eps=1e-2, cov_update_every=1),
    "low_supervision": dict(shortcut="probs", embedding_dim=16),
    "adaptive": dict(branches=None),
}
_KEY = "multitask.arch_options."


def _check_arch(arch: Any) -> None:
  if arch not in ARCHS:
    close = difflib.get_close_matches(str(arch), ARCHS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown multitask arch {arch!r}{hint}; choose one of: {', '.join(ARCHS)} "
                      "(--config.multitask.arch)")


def arch_options(arch: str) -> dict[str, Any]:
  """The options of `arch` and their defaults."""
  _check_arch(arch)
  return dict(_DEFAULTS[arch])


def _tuples(value: Any) -> Any:
  # Config lists become tuples: module fields must be hashable.
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve_options(arch: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
  """`options` over the arch's defaults (None -> default); ConfigError on an unknown key."""
  defaults = arch_options(arch)
  given = dict(options.items()) if options else {}
  for key in given:
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      valid = ", ".join(defaults) or "none"
      raise ConfigError(f"arch {arch!r} has no option {key!r}{hint}; its options: {valid} "
                        f"(--config.{_KEY}KEY; set a leftover option to None to drop it)")
  return {k: _tuples(given[k]) if given.get(k) is not None else v for k, v in defaults.items()}


def _check_choice(value: Any, key: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}; "
                      f"set --config.{_KEY}{key}")


def _check_leaves(rules: Any) -> tuple[tuple[str, bool], ...]:
  if isinstance(rules, str):
    rules = ((rules, True), (".*", False))
  masks.compile_rules(rules, what=f"{_KEY}leaves rule")
  for pattern, value in rules:
    if not isinstance(value, bool):
      raise ConfigError(f"{_KEY}leaves rule ({pattern!r}, {value!r}) must map to True/False; "
                        f"set --config.{_KEY}leaves")
  return tuple((str(p), bool(v)) for p, v in rules)


def _check_stitch_after(value: Any, num_stages: int) -> tuple[int, ...]:
  if value is None:
    return tuple(range(1, num_stages + 1))
  after = value if isinstance(value, tuple) else (value,)
  if (not after or len(set(after)) != len(after)
      or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_stages
                 for k in after)):
    raise ConfigError(f"stitch_after must be distinct stage numbers in 1..{num_stages} (or None for "
                      f"every stage), got {value!r}; set --config.{_KEY}stitch_after")
  return tuple(sorted(after))


def _check_tasks(tasks: Sequence[Task], arch: str) -> tuple[Task, ...]:
  tasks = tuple(tasks)
  if not tasks:
    raise ConfigError("a multitask model needs at least one task; set config.tasks")
  for t in tasks:
    if not t.name or "/" in t.name or (arch == "adaptive" and "+" in t.name):
      bad = "'/' or '+'" if arch == "adaptive" else "'/'"
      raise ConfigError(f"task name {t.name!r} cannot be empty or contain {bad} (it names "
                        f"parameter paths); rename config.tasks.{t.name}")
  return tasks


def build(arch: str, tasks: Sequence[Task], model_config: Mapping[str, Any],
          options: Mapping[str, Any] | None = None) -> nn.Module:
  """The multitask module `arch` for `tasks`, with the trunk/towers of the registry model `model_config`.

  Raises:
    ConfigError: unknown arch or option, a value out of range, a model that the arch cannot stage,
      a task depth beyond the trunk, or a malformed `branches` structure.
  """
  _check_arch(arch)
  tasks = _check_tasks(tasks, arch)
  opts = resolve_options(arch, options)
  if arch in STAGED_ARCHS:
    others = ", ".join(a for a in STAGED_ARCHS if a != arch)
    tower = stages.staged(model_config,
                          needed_by=f"arch {arch!r} runs the trunk stage by stage (so do {others})")
  else:
    tower = registry.build(model_config, num_classes=0).backbone
  for key in ("weight", "init_diagonal", "alpha_diagonal", "beta_top"):
    if key in opts:
      high = None if key == "weight" else 1.0
      check_number(opts[key], _KEY + key, low=0.0, high=high)
  if arch == "hard":
    return trunk.HardSharing(backbone=tower, tasks=tasks)
  if arch in ("soft_l2", "soft_trace"):
    return towers.SoftSharing(tower=tower, tasks=tasks, penalty=arch[len("soft_"):],
                              weight=float(opts["weight"]), leaves=_check_leaves(opts["leaves"]))
  if arch == "cross_stitch":
    _check_choice(opts["granularity"], "granularity", ("scalar", "channel"))
    return towers.CrossStitch(tower=tower, tasks=tasks,
                              stitch_after=_check_stitch_after(opts["stitch_after"], tower.num_stages),
                              granularity=opts["granularity"],
                              init_diagonal=float(opts["init_diagonal"]))
  if arch == "sluice":
    check_positive_int(opts["subspaces"], _KEY + "subspaces")
    if any(width % opts["subspaces"] for width in tower.stage_widths):
      raise ConfigError(f"subspaces={opts['subspaces']} must divide every stage width "
                        f"{tower.stage_widths}; set --config.{_KEY}subspaces")
    _check_choice(opts["orthogonality_rows"], "orthogonality_rows", ("mean", "sum"))
    return towers.Sluice(tower=tower, tasks=tasks, subspaces=opts["subspaces"],
                         weight=float(opts["weight"]), alpha_diagonal=float(opts["alpha_diagonal"]),
                         beta_top=float(opts["beta_top"]),
                         orthogonality_rows=opts["orthogonality_rows"])
  if arch == "relationship":
    check_positive_int(opts["task_layers"], _KEY + "task_layers")
    check_positive_int(opts["width"], _KEY + "width", allow_none=True)
    check_positive_int(opts["cov_update_every"], _KEY + "cov_update_every")
    check_number(opts["eps"], _KEY + "eps", low=0.0, high=1.0, low_open=True, high_open=True)
    return relationship.Relationship(backbone=tower, tasks=tasks, task_layers=opts["task_layers"],
                                     width=opts["width"], weight=float(opts["weight"]),
                                     eps=float(opts["eps"]),
                                     cov_update_every=opts["cov_update_every"])
  if arch == "low_supervision":
    _check_choice(opts["shortcut"], "shortcut", trunk.SHORTCUTS)
    check_positive_int(opts["embedding_dim"], _KEY + "embedding_dim")
    trunk.task_depths(tasks, tower.num_stages)
    return trunk.LowSupervision(backbone=tower, tasks=tasks, shortcut=opts["shortcut"],
                                embedding_dim=opts["embedding_dim"])
  names = [t.name for t in tasks]
  branches = opts["branches"] or ((tuple(names),),) * tower.num_stages
  return adaptive.Adaptive(tower=tower, tasks=tasks,
                           branches=adaptive.check_branches(branches, names, tower.num_stages))
