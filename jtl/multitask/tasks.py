"""Tasks of a multitask run: what each predicts, from which batch feature, with which error function.

A task is declared in `config.tasks` as `{name: dict(kind=..., feature=..., num_outputs=..., ...)}`:

  kind         multiclass | binary | multilabel | regression: fixes the output activation and the
               error function (`jtl.losses.likelihood`), each the negative log-likelihood of its model
  feature      the batch key holding its target (default: the task's name)
  num_outputs  head width: classes (multiclass), labels (multilabel), targets (regression), 1 (binary)
  depth        the trunk stage after which its head attaches (`arch=low_supervision`; None = the top)
  label_noise  binary/multilabel only: label-flip probability eps of the noisy-label likelihood
  weight       static loss weight (`weighting=static`)
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from jtl.config import check_number
from jtl.errors import ConfigError

KINDS = ("multiclass", "binary", "multilabel", "regression")
_DEFAULTS = dict(kind=None, feature=None, num_outputs=None, depth=None, label_noise=0.0, weight=1.0)


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its name, error function (`kind`), target feature, head width and attachment depth."""
  name: str
  kind: str
  feature: str
  num_outputs: int
  depth: int | None = None
  label_noise: float = 0.0
  weight: float = 1.0


def parse_tasks(tasks_config: Mapping[str, Any] | None) -> tuple[Task, ...]:
  """`config.tasks` -> Tasks in config order; ConfigError names the key to fix."""
  if not tasks_config:
    raise ConfigError("a multitask run needs tasks: set config.tasks = {name: dict(kind=..., "
                      "num_outputs=...)} in the config file")
  out = []
  for name, spec in tasks_config.items():
    spec = dict(spec.items())
    for key in spec:
      if key not in _DEFAULTS:
        close = difflib.get_close_matches(key, list(_DEFAULTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task {name!r} has no option {key!r}{hint}; valid: "
                          f"{', '.join(_DEFAULTS)} (--config.tasks.{name}.KEY)")
    spec = {**_DEFAULTS, **spec}
    kind = spec["kind"]
    if kind not in KINDS:
      raise ConfigError(f"task {name!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)} "
                        f"(--config.tasks.{name}.kind)")
    n = spec["num_outputs"] if spec["num_outputs"] is not None else (1 if kind == "binary" else None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (kind == "multiclass" and n < 2):
      raise ConfigError(f"task {name!r}: num_outputs must be a positive int (>= 2 classes for "
                        f"multiclass), got {spec['num_outputs']!r} (--config.tasks.{name}.num_outputs)")
    if kind == "binary" and n != 1:
      raise ConfigError(f"task {name!r}: a binary task has one output, got num_outputs={n} "
                        f"(--config.tasks.{name}.num_outputs)")
    depth = spec["depth"]
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
      raise ConfigError(f"task {name!r}: depth must be a stage number >= 1 or None, got {depth!r} "
                        f"(--config.tasks.{name}.depth)")
    check_number(spec["label_noise"], f"tasks.{name}.label_noise", low=0.0, high=0.5, high_open=True)
    if spec["label_noise"] and kind not in ("binary", "multilabel"):
      raise ConfigError(f"task {name!r}: label_noise applies to binary and multilabel tasks only "
                        f"(--config.tasks.{name}.label_noise)")
    check_number(spec["weight"], f"tasks.{name}.weight", low=0.0, low_open=True)
    out.append(Task(name=name, kind=kind, feature=spec["feature"] or name, num_outputs=n,
                    depth=depth, label_noise=float(spec["label_noise"]),
                    weight=float(spec["weight"])))
  return tuple(out)
