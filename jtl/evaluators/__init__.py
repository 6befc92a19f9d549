"""Evaluators from config, big_vision style: `config.evals = {name: dict(type=..., split=..., ...)}`.

Each evaluator is a short class whose `run(params, model_state)` yields `(key, value)` pairs, keys
prefixed by split (`test/accuracy`, `test/knn_accuracy`, `test/left/accuracy`). The checkpoint loop
(`jtl.evaluate`) builds them once and calls them on every checkpoint; nothing else knows which exist.

Types: `metrics` (the objective's own per-example metrics averaged over a split; the default). More
types register themselves with `@register("name")` in the modules imported below.
"""
from jtl.evaluators.base import EVALUATORS, Evaluator, build, collect, register, split_batches
from jtl.evaluators import metrics  # noqa: F401  (registers "metrics")

__all__ = ["EVALUATORS", "Evaluator", "build", "collect", "register", "split_batches"]
