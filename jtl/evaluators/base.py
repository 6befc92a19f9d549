"""The evaluator interface, the registry, and helpers to run a function over a whole split.

An evaluator is built once per run from `(setup, name, cfg)` — `cfg` being its entry in
`config.evals` — and then `run(params, model_state)` yields `(key, value)` pairs for one checkpoint.
Every entry has `type` (a registered name), `split` (default: `config.data.eval_split`), optional
`data` (overrides of `config.data` for this evaluator: another dataset, `labels`, `shots`, ...) and
`batch_size`; a type adds its own keys, and an unknown key is a ConfigError naming the valid ones.
"""
from __future__ import annotations

import abc
import difflib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jtl import data
from jtl.errors import ConfigError
from jtl.sharding import to_global

if TYPE_CHECKING:
  from jtl.train import Setup

COMMON_KEYS = {"type": None, "split": None, "data": None, "batch_size": None}


class Evaluator(abc.ABC):
  """Base: validated options in `self.options`, the split's data config in `self.data_config`."""

  # Type-specific options and their defaults; subclasses extend.
  OPTIONS: dict[str, Any] = {}

  def __init__(self, s: "Setup", name: str, cfg: ml_collections.ConfigDict | dict):
    self.setup, self.name = s, name
    given = dict(cfg.items()) if cfg is not None else {}
    valid = {**COMMON_KEYS, **self.OPTIONS}
    for key in given:
      if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"evaluator {name!r} ({given.get('type')}) has no option {key!r}{hint}; "
                          f"valid: {', '.join(valid)} (--config.evals.{name}.KEY)")
    self.options = {**self.OPTIONS, **{k: v for k, v in given.items() if k in self.OPTIONS}}
    overrides = given.get("data") or {}
    base = s.config.data.to_dict()
    self.data_config = ml_collections.ConfigDict({**base, **dict(overrides)})
    self.split = given.get("split") or self.data_config.get("eval_split")
    self.batch_size = (given.get("batch_size") or s.config.get("eval", {}).get("batch_size")
                       or s.config.batch_size)
    self.prefix = self.split.split("[")[0]

  @abc.abstractmethod
  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    """`(key, value)` pairs for one checkpoint's variables."""


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(type_name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
  """Class decorator: makes an evaluator available as `config.evals.NAME.type = type_name`."""
  def decorator(cls: type[Evaluator]) -> type[Evaluator]:
    EVALUATORS[type_name] = cls
    return cls
  return decorator


def build(s: "Setup") -> list[Evaluator]:
  """The evaluators of `config.evals`; without any, a `metrics` evaluator per `config.eval.splits`
  (default: `data.eval_split`)."""
  config = s.config
  evals = config.get("evals") or {}
  if not evals:
    splits = config.get("eval", {}).get("splits") or (config.data.eval_split,)
    return [EVALUATORS["metrics"](s, split, {"type": "metrics", "split": split}) for split in splits]
  out = []
  for name, cfg in evals.items():
    kind = cfg.get("type") if cfg is not None else None
    if kind not in EVALUATORS:
      close = difflib.get_close_matches(str(kind), list(EVALUATORS), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown evaluator type {kind!r} for config.evals.{name}{hint}; choose one "
                        f"of {', '.join(sorted(EVALUATORS))} (--config.evals.{name}.type)")
    out.append(EVALUATORS[kind](s, name, cfg))
  return out


def split_batches(s: "Setup", data_config: ml_collections.ConfigDict, split: str,
                  batch_size: int) -> tuple[Callable[[], Iterator[dict]], int]:
  """(factory of host-local eval batches with `mask`, number of batches) for one split."""
  divisor = s.mesh.size
  if batch_size % divisor:
    raise ConfigError(f"evaluation batch size {batch_size} does not split over {divisor} devices; "
                      "use a multiple (--config.eval.batch_size)")
  return data.eval_iterator(data_config, split=split, global_batch_size=batch_size,
                            process_index=jax.process_index(), process_count=jax.process_count())


def collect(s: "Setup", fn: Callable[..., dict[str, jax.Array]], make_batches: Callable,
            *args: Any) -> dict[str, np.ndarray]:
  """Runs `fn(*args, batch) -> {name: [B, ...]}` jitted over every batch of a split; returns the
  outputs of the real (unpadded) examples, in split order, as host numpy arrays (every host has all)."""
  replicated = NamedSharding(s.mesh, PartitionSpec())
  run = jax.jit(fn, out_shardings=replicated)
  parts: dict[str, list[np.ndarray]] = {}
  for local_batch in make_batches():
    batch = to_global(local_batch, s.batch_sharding)
    out = jax.device_get({**run(*args, batch), "__mask__": batch["mask"] > 0})
    keep = np.asarray(out.pop("__mask__"))
    for key, value in out.items():
      parts.setdefault(key, []).append(np.asarray(value)[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def masked_sums(per_example: dict[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
  """Sums of per-example values over real examples (a value [B, ...] sums its trailing axes too)."""
  return {k: jnp.sum(v.reshape(v.shape[0], -1).mean(axis=1) * mask) for k, v in per_example.items()}
