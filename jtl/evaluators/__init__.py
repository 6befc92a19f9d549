"""Evaluators from config, big_vision style: `config.evals = {name: dict(type=..., split=..., ...)}`.

Each evaluator is a short class whose `run(params, model_state)` yields `(key, value)` pairs, keys
prefixed by split (`test/accuracy`, `test/knn_accuracy`, `test/left/accuracy`). The checkpoint loop
(`jtl.evaluate`) builds them once and calls them on every checkpoint; nothing else knows which exist.

Types: `metrics` (the objective's own per-example metrics averaged over a split; the default),
`multitask` (the same per task, and Delta_m against single-task references), and those of the
modules imported below, each registered with `@register("name")`.
"""
from jtl.evaluators.base import EVALUATORS, Evaluator, build, collect, register, split_batches
from jtl.evaluators import metrics  # noqa: F401  (registers "metrics")
from jtl.evaluators import multitask  # noqa: F401  (registers "multitask": per task and Delta_m)
from jtl.evaluators import representation  # noqa: F401  (knn, linear_probe, zero_shot, retrieval)
from jtl.evaluators import episodic  # noqa: F401  (few-shot N-way K-shot episodes, 95% CI)

__all__ = ["EVALUATORS", "Evaluator", "build", "collect", "register", "split_batches"]
