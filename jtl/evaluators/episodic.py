"""`episodic`: few-shot accuracy over a fixed set of N-way K-shot test episodes, with a 95% CI.

The protocol of the few-shot literature (Vinyals et al. 2016; Snell et al. 2017, Sec. 3; Finn et
al. 2017, Sec. 5.1): `num_episodes` episodes (default 600) drawn once from the evaluator's split and
classes (`data` overrides, e.g. `data=dict(labels=(5, 6, 7, 8, 9))` on the test split). Episode i
is a function of (`seed`, i) only (`jtl.data.episodes.fixed_episodes`), so every checkpoint and
every run sees the same ones. A checkpoint is scored in one of two ways (`method`):

* `prototypes`: nearest prototype on frozen features (Snell et al. eqs. 1-2: class means of the
  support features, queries to the closest mean in squared Euclidean distance). It works for any
  objective with `features(params, model_state, images) -> [B, D]` (supervised, contrastive,
  ProtoNet, ...). Without that method it falls back to `objective.model.apply(...,
  method="features")`. Features are per image in inference mode, so the pool is embedded once per
  checkpoint and the episodes are gathered from it.
* `adapt`: the objective scores each episode itself, `episode_accuracy(params, model_state,
  episodes) -> [E]` (MAML: adapt on the support set, score the queries), jitted and run on
  `batch_size` episodes at a time, sharded over the batch axes. `adapt_steps` (default None: the
  objective's own, e.g. `maml.eval_inner_steps`) sets the number of adaptation steps, passed as
  `episode_accuracy(..., steps=n)`: an evaluator-side choice, so one evaluation can compare several
  (give each a `tag`; `maml_glyphs.py:holdout=...` does).
`auto` (default) picks `adapt` when the objective has `episode_accuracy`, else `prototypes`.

Evaluators of one run that read the same pool (the same split and data options, e.g. 5-way and
20-way at 1 and 5 shots) share it: it is loaded once, and embedded once per checkpoint
(`_SharedPools`).

`batch_size` (a multiple of the devices of the batch axes) is images per forward pass for
`prototypes` and episodes per call for `adapt`; a short last batch is padded and the padding
dropped.

`pixel_baseline=True` also reports nearest prototypes on the raw (normalised) pixels of the same
episodes: the reference a learned representation has to beat.

Keys: `<split>/<N>way<K>shot_accuracy` and `<split>/<N>way<K>shot_ci95` (the half-width 1.96 *
std / sqrt(n) over episodes), plus `..._pixel_accuracy` / `..._pixel_ci95` for the baseline, or
`<split>/<tag>/...` with the option `tag`. Run one evaluator per shot count (1 and 5 shots: two
entries in `config.evals`).
"""
from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jtl import sharding
from jtl.config import check_positive_int
from jtl.data import episodes
from jtl.data import source
from jtl.errors import ConfigError
from jtl.evaluators.base import Evaluator, register
from jtl.objectives.base import apply_model

METHODS = ("auto", "prototypes", "adapt")


def prototype_accuracy(features: np.ndarray, support_rows: np.ndarray, query_rows: np.ndarray,
                       spec: episodes.EpisodeSpec) -> np.ndarray:
  """Per-episode accuracy [n] of nearest-prototype classification on fixed features [M, D].

  Rows are class-major (`jtl.data.episodes`). The prototype of class n is the mean feature of its K
  support rows (Snell et al. 2017, eq. 1). A query goes to the prototype at the smallest squared
  Euclidean distance (eq. 2), ties to the lower label. Distances are taken from differences, which
  do not cancel the way |q|^2 - 2 q.p + |p|^2 can.
  """
  features = np.asarray(features, np.float32).reshape(len(features), -1)
  num, dim = len(support_rows), features.shape[1]
  protos = features[support_rows].reshape(num, spec.ways, spec.shots, dim).mean(axis=2)
  query_labels = episodes.episode_labels(spec, spec.queries)
  chunk = max(1, (1 << 24) // max(1, query_rows.shape[1] * spec.ways * dim))  # ~64 MiB at a time
  correct = []
  for start in range(0, num, chunk):
    queries = features[query_rows[start:start + chunk]]  # [c, N*Q, D]
    diffs = queries[:, :, None, :] - protos[start:start + chunk, None, :, :]
    correct.append(np.argmin(np.sum(diffs**2, axis=-1), axis=-1) == query_labels)
  return np.concatenate(correct).mean(axis=1)


def mean_and_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
  """(mean, 1.96 * std / sqrt(n)): the normal 95% interval half-width used in few-shot papers.

  Uses the population std (ddof=0), as the common protocol code does. At 600 episodes the ddof
  choice changes the half-width by less than 0.1%.
  """
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values)))


def feature_function(objective: Any) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """`objective.features`, or the model's `features` method in inference mode as a fallback."""
  if callable(getattr(objective, "features", None)):
    return objective.features
  model = getattr(objective, "model", None)
  if model is None:
    raise ConfigError(f"evaluator type 'episodic' needs features; {type(objective).__name__} has "
                      "neither a features method nor a model; remove the evaluator from "
                      "config.evals")

  def features(params, model_state, images):
    return apply_model(model, params, model_state, images, train=False, method="features")[0]

  return features


def global_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole, as a global array split along its leading axis."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class _SharedPools:
  """The pools of the current run's episodic evaluators, each loaded once, and each pool's features
  for the checkpoint last embedded, kept while the same variables come back (the next evaluator of
  that checkpoint). One run at a time: a new Setup starts afresh."""
  setup: Any = None
  pools: dict[str, episodes.ClassPool] = {}
  features: dict[tuple[str, int], tuple[Any, Any, np.ndarray]] = {}

  @classmethod
  def pool(cls, s: Any, key: str, load: Callable[[], episodes.ClassPool]) -> episodes.ClassPool:
    if cls.setup is not s:
      cls.setup, cls.pools, cls.features = s, {}, {}
    if key not in cls.pools:
      cls.pools[key] = load()
    return cls.pools[key]


@register("episodic")
class Episodic(Evaluator):
  """Yields `<split>/<N>way<K>shot_accuracy` and `_ci95` (and the pixel baseline's, if asked)."""

  OPTIONS = {"ways": 5, "shots": 1, "queries": 15, "num_episodes": 600, "seed": 0,
             "method": "auto", "pixel_baseline": False, "tag": None, "adapt_steps": None}

  def __init__(self, s, name: str, cfg: ml_collections.ConfigDict | dict):
    super().__init__(s, name, cfg)
    o = self.options
    for key, low in (("ways", 2), ("shots", 1), ("queries", 1), ("num_episodes", 1)):
      check_positive_int(o[key], f"evals.{name}.{key}", minimum=low)
    if not isinstance(o["seed"], int) or isinstance(o["seed"], bool):
      raise ConfigError(f"evals.{name}.seed must be an integer, got {o['seed']!r}")
    if o["method"] not in METHODS:
      raise ConfigError(f"evals.{name}.method={o['method']!r}; choose one of {', '.join(METHODS)}")
    check_positive_int(o["adapt_steps"], f"evals.{name}.adapt_steps", minimum=0, allow_none=True)
    self.spec = episodes.EpisodeSpec(o["ways"], o["shots"], o["queries"])
    self.pool_key = json.dumps([self.split, self.data_config.to_dict()], sort_keys=True, default=repr)
    self.pool = _SharedPools.pool(
        s, self.pool_key, lambda: episodes.class_pool(source.validate(self.data_config), self.split))
    episodes.check_pool(self.pool, self.spec, f"evals.{name} (split {self.split!r})")
    self.support_rows, self.query_rows, _ = episodes.fixed_episodes(
        self.pool, self.spec, o["num_episodes"], o["seed"])
    objective = s.objective
    self.method = o["method"]
    adapts = callable(getattr(objective, "episode_accuracy", None))
    if self.method == "auto":
      self.method = "adapt" if adapts else "prototypes"
    if self.method == "adapt":
      if not adapts:
        raise ConfigError(f"evals.{name}.method='adapt' needs the objective's episode_accuracy, "
                          f"which {type(objective).__name__} lacks; use method='prototypes'")
      ways = getattr(objective, "ways", self.spec.ways)
      if ways != self.spec.ways:
        raise ConfigError(f"evals.{name}.ways={self.spec.ways} but the objective adapts a {ways}-"
                          f"way head; set --config.evals.{name}.ways={ways}")
      fn = objective.episode_accuracy
      if o["adapt_steps"] is not None:
        if "steps" not in inspect.signature(fn).parameters:
          raise ConfigError(f"evals.{name}.adapt_steps: {type(objective).__name__}."
                            "episode_accuracy takes no `steps`; remove adapt_steps")
        fn = functools.partial(fn, steps=o["adapt_steps"])
    elif o["adapt_steps"] is not None:
      raise ConfigError(f"evals.{name}.adapt_steps applies to method='adapt' only, not "
                        f"{self.method!r}; remove it or set --config.evals.{name}.method=adapt")
    else:
      fn = feature_function(objective)
    divisor = sharding.batch_size_divisor(s.mesh, s.config.mesh.batch_axes)
    if self.batch_size % divisor:
      raise ConfigError(f"evals.{name}: batch size {self.batch_size} does not split over the "
                        f"{divisor} devices of the batch axes; use a multiple "
                        f"(--config.evals.{name}.batch_size)")
    self._run = jax.jit(fn, out_shardings=NamedSharding(s.mesh, PartitionSpec()))
    self._pixel_result: tuple[float, float] | None = None
    tag = f"{o['tag']}/" if o["tag"] else ""
    self.key = f"{self.prefix}/{tag}{self.spec.ways}way{self.spec.shots}shot"

  def _chunks(self, num: int) -> Iterator[tuple[np.ndarray, int]]:
    """(indices padded to batch_size with index 0, number of real ones) covering range(num)."""
    for start in range(0, num, self.batch_size):
      real = np.arange(start, min(start + self.batch_size, num))
      yield np.concatenate([real, np.zeros(self.batch_size - len(real), int)]), len(real)

  def pool_features(self, params: Any, model_state: Any) -> np.ndarray:
    """float32 [M, D]: inference-mode features of every image of the pool (computed once per
    checkpoint for the evaluators that share the pool and the batch size)."""
    key = (self.pool_key, self.batch_size)
    kept = _SharedPools.features.get(key) if _SharedPools.setup is self.setup else None
    if kept is not None and kept[0] is params and kept[1] is model_state:
      return kept[2]
    out = []
    for index, real in self._chunks(len(self.pool.images)):
      images = global_rows(self.pool.images[index], self.setup.batch_sharding)
      out.append(np.asarray(jax.device_get(self._run(params, model_state, images)))[:real])
    features = np.concatenate(out).astype(np.float32)
    if _SharedPools.setup is self.setup:
      _SharedPools.features[key] = (params, model_state, features)
    return features

  def adapted_accuracy(self, params: Any, model_state: Any) -> np.ndarray:
    """[n]: the objective's own per-episode accuracy (`episode_accuracy`) on every test episode."""
    out = []
    for index, real in self._chunks(len(self.support_rows)):
      batch = episodes.episode_batch(self.pool, self.spec, self.support_rows[index],
                                     self.query_rows[index])
      batch = jax.tree.map(lambda x: global_rows(x, self.setup.batch_sharding), batch)
      out.append(np.asarray(jax.device_get(self._run(params, model_state, batch)))[:real])
    return np.concatenate(out)

  def pixel_baseline(self) -> tuple[float, float]:
    """(mean, ci95) of nearest prototypes on raw pixels; it does not depend on the checkpoint."""
    if self._pixel_result is None:
      self._pixel_result = mean_and_ci95(prototype_accuracy(
          self.pool.images, self.support_rows, self.query_rows, self.spec))
    return self._pixel_result

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    if self.method == "adapt":
      accuracy = self.adapted_accuracy(params, model_state)
    else:
      accuracy = prototype_accuracy(self.pool_features(params, model_state), self.support_rows,
                                    self.query_rows, self.spec)
    mean, ci95 = mean_and_ci95(accuracy)
    yield f"{self.key}_accuracy", mean
    yield f"{self.key}_ci95", ci95
    if self.options["pixel_baseline"]:
      mean, ci95 = self.pixel_baseline()
      yield f"{self.key}_pixel_accuracy", mean
      yield f"{self.key}_pixel_ci95", ci95
