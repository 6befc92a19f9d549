"""`multitask`: per-task metrics (as `metrics` gives them) and Delta_m against single-task references.

Delta_m (Maninis et al. 2019; Vandenhende et al. 2021) = 100/T * sum_t s_t (M_t - R_t) / R_t, over the
tasks with a reference R_t, on each task's primary metric M_t (accuracy for multiclass and binary tasks,
label accuracy for multi-label ones, the noise variance for regression), s_t = +1 where higher is
better and -1 where lower is: positive means the multitask model beats its single-task references.
A reference is a number or the workdir of an evaluated single-task run (its last `eval_metrics.jsonl`
row, key `<split>/<task>/<metric>` or `<split>/<metric>`).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from etils import epath

from jtl.config import resolve_path
from jtl.errors import ConfigError
from jtl.evaluators.base import register
from jtl.evaluators.metrics import Metrics
from jtl.metric_writer import read_jsonl

PRIMARY = {"multiclass": ("accuracy", +1), "binary": ("accuracy", +1),
           "multilabel": ("label_accuracy", +1), "regression": ("noise_variance", -1)}


@register("multitask")
class MultitaskMetrics(Metrics):
  """`metrics`, plus `<split>/delta_m` when `references` are given."""

  OPTIONS = {"references": None}

  def __init__(self, s, name, cfg):
    super().__init__(s, name, cfg)
    tasks = getattr(s.objective, "tasks", None)
    if tasks is None:
      raise ConfigError(f"evaluator {name!r} of type multitask needs a multitask objective "
                        "(--config.objective=multitask)")
    self.tasks = {t.name: t for t in tasks}
    self.references = {}
    for task, value in dict(self.options["references"] or {}).items():
      if task not in self.tasks:
        raise ConfigError(f"evals.{name}.references names task {task!r}, which is not one of "
                          f"{', '.join(self.tasks)}")
      self.references[task] = self._reference(task, value)

  def _reference(self, task: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    metric, _ = PRIMARY[self.tasks[task].kind]
    path = epath.Path(resolve_path(str(value))) / "eval_metrics.jsonl"
    rows = read_jsonl(path)
    keys = (f"{self.prefix}/{task}/{metric}", f"{self.prefix}/{metric}")
    for key in keys:
      if rows and key in rows[-1]:
        return float(rows[-1][key])
    raise ConfigError(f"reference for task {task!r}: {path} has no {' or '.join(keys)}; train and "
                      "evaluate the single-task run first, or give a number")

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    values = dict(super().run(params, model_state))
    yield from values.items()
    if self.references:
      terms = []
      for task, reference in self.references.items():
        metric, sign = PRIMARY[self.tasks[task].kind]
        terms.append(sign * (values[f"{self.prefix}/{task}/{metric}"] - reference) / reference)
      yield f"{self.prefix}/delta_m", 100.0 * sum(terms) / len(terms)
