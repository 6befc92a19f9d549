"""Representation evaluators: `knn`, `linear_probe` (frozen features), `zero_shot`, `retrieval`.

They read what the objective exposes, duck-typed (a missing method is a ConfigError naming it):
`features(params, model_state, images) -> [B, D]` (encoder features before any projection: every
objective with an encoder has it, `Supervised` included, so supervised and contrastive checkpoints
are compared by the same kNN and probe), `embed_images(...) -> [B, E]`, `embed_text(params,
model_state, tokens) -> [B, E]` and `prompt_tokens(classes) -> int32 [C, P, L]` (zero-shot prompts
from held-out templates).

kNN and the probe read two splits: a bank / probe-fitting side, `train_split` (default: the data
config's train split) with the evaluator's `data` overrides plus `train_data` overrides, and the
scored side, `split`. `data.shots` (and `shots_seed`) apply to the fitting side only, so
`data=dict(labels=(5,6,7,8,9), shots=5)` is the few-shot protocol: fit on 5 labelled digits per
class of 5-9, score on every test digit of 5-9.

Both take `input="pixels"`: the same protocol on the flattened input images (as the pipeline
yields them, normalised, not augmented) instead of the encoder's features, so a raw-pixel baseline
sees exactly the examples and code an encoder does; it needs no objective method.

* knn: cosine kNN with exp(sim/T)-weighted votes (Wu et al. 2018; DINO's k=20, T=0.07); k is capped
  at the bank size (a 1-shot, 5-class bank has 5 entries).
* linear_probe: closed-form ridge on standardised features (`jtl.probes`, default) or a softmax
  regression trained full-batch with Adam for a fixed number of steps (`method="softmax"`).
* zero_shot: each image goes to the class whose mean prompt embedding is most cosine-similar
  (CLIP's prompt ensembling, Radford et al. 2021, Sec. 3.1.4), over the classes of the split.
* retrieval: the gallery of captions is every held-out prompt of every class (C*P distinct
  captions), and since a caption describes a class, not an image, an item is *relevant* when its
  class is the query's class. Image->text: each test image queries the C*P captions; text->image:
  each caption queries the test images. Recall@k = the fraction of queries with a relevant item in their top k.
  Chance Recall@1 is 1/C in both directions (for balanced classes).

zero_shot and retrieval take `chance=True`: each metric also comes as `<metric>_chance`, its
expected value for a random guess on this very split and gallery (zero-shot: 1/C; Recall@k: a
uniformly random ranking, `recall_chance`), so a table's chance row is computed, not typed in.

Keys are `<split>/<metric>`, or `<split>/<tag>/<metric>` with the option `tag`, so several
evaluators of one type (1-shot and 5-shot probes) can share a split.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jtl import data, probes
from jtl.errors import ConfigError
from jtl.evaluators.base import Evaluator, collect, register, split_batches

# Shared jitted feature functions, one per (objective, method), so evaluators of one objective
# compile each method once however many of them there are.
_FEATURE_FNS: "weakref.WeakKeyDictionary[Any, dict[str, Callable]]" = weakref.WeakKeyDictionary()


def require(objective: Any, methods: Sequence[str], evaluator: str) -> None:
  """ConfigError unless the objective has every method the evaluator needs."""
  missing = [m for m in methods if not callable(getattr(objective, m, None))]
  if missing:
    raise ConfigError(f"evaluator type {evaluator!r} needs the objective to have "
                      f"{', '.join(missing)}, which {type(objective).__name__} lacks; use an "
                      f"objective that provides it or remove the evaluator from config.evals")


def _pixels(params, model_state, batch):
  del params, model_state
  return {"x": batch["image"].reshape(batch["image"].shape[0], -1), "label": batch["label"]}


def _feature_fn(objective: Any, method: str) -> Callable:
  if method == "pixels":  # no objective method: the flattened input images
    return _pixels
  fns = _FEATURE_FNS.setdefault(objective, {})
  if method not in fns:
    embed = getattr(objective, method)
    fns[method] = lambda params, model_state, batch: {
        "x": embed(params, model_state, batch["image"]), "label": batch["label"]}
  return fns[method]


def classes_of(data_config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The dataset class ids of a data config, in the order of its (remapped) labels."""
  if data_config.get("labels") is not None:
    return tuple(int(c) for c in data_config.labels)
  return tuple(range(data.num_classes(data_config)))


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, feats: np.ndarray,
                 labels: np.ndarray, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> float:
  """Accuracy of weighted cosine kNN (k capped at the bank size) fitted on the train side."""
  predicted = probes.knn_classify(train_feats, train_labels, feats, num_classes=num_classes,
                                  k=min(k, len(train_feats)), temperature=temperature)
  return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def _softmax_probe(train_feats, train_labels, feats, num_classes, steps, lr, weight_decay):
  mean, std = jnp.mean(train_feats, 0), jnp.std(train_feats, 0)
  scale = jnp.where(std > 1e-6 * jnp.maximum(jnp.max(std), 1e-30), std, 1.0)
  x, x_eval = (train_feats - mean) / scale, (feats - mean) / scale
  targets = jax.nn.one_hot(train_labels, num_classes)
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  tx = optax.adamw(lr, weight_decay=weight_decay)

  def loss_fn(p):
    return optax.softmax_cross_entropy(x @ p[0] + p[1], targets).mean()

  def step(_, carry):
    p, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss_fn)(p), opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return jnp.argmax(x_eval @ params[0] + params[1], axis=1)


_softmax_probe_jit = jax.jit(_softmax_probe, static_argnums=(3, 4))


def linear_probe_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, feats: np.ndarray,
                          labels: np.ndarray, *, num_classes: int, method: str = "ridge",
                          l2: float = 1e-3, steps: int = 300, lr: float = 0.05,
                          weight_decay: float = 1e-4) -> float:
  """Accuracy of a linear classifier fitted on frozen train features: closed-form ridge (`l2`
  relative to the mean eigenvalue, see `jtl.probes`) or softmax regression (Adam, `steps` full-batch
  steps on standardised features)."""
  if method == "ridge":
    probe = probes.ridge_probe_fit(train_feats, train_labels, num_classes=num_classes, l2=l2)
    predicted = probes.ridge_probe_predict(probe, feats)
  elif method == "softmax":
    predicted = _softmax_probe_jit(jnp.asarray(train_feats, jnp.float32),
                                   jnp.asarray(train_labels), jnp.asarray(feats, jnp.float32),
                                   num_classes, steps, lr, weight_decay)
  else:
    raise ConfigError(f"unknown linear_probe method {method!r}; choose 'ridge' or 'softmax'")
  return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def recall_chance(relevant: Sequence[int], gallery: int, k: int) -> float:
  """Expected Recall@k of a uniformly random ranking of a gallery of `gallery` items, averaged over
  queries, query i having `relevant[i]` relevant items: 1 - C(gallery - r, k) / C(gallery, k) each
  (the chance that none of the r relevant items is among the k drawn without replacement)."""
  if not 1 <= k <= gallery:
    raise ValueError(f"k={k} must be in [1, gallery={gallery}]")
  per_query = [1 - math.comb(gallery - int(r), k) / math.comb(gallery, k) for r in relevant]
  return float(np.mean(per_query))


def retrieval_chance(labels: np.ndarray, num_classes: int, num_prompts: int,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """`retrieval_recalls`' keys at chance: image->text queries have `num_prompts` relevant captions
  among C*P, the captions of class c have the count of class-c images relevant among them all."""
  counts = np.bincount(np.asarray(labels), minlength=num_classes)
  sides = (("i2t", [num_prompts] * len(labels), num_classes * num_prompts),
           ("t2i", np.repeat(counts, num_prompts), len(labels)))
  out = {}
  for direction, relevant, gallery in sides:
    out.update({f"{direction}_r{k}": recall_chance(relevant, gallery, k) for k in ks
                if k <= gallery})
  return out


def class_text_embeddings(objective: Any, params: Any, model_state: Any,
                          classes: Sequence[int]) -> np.ndarray:
  """float32 [C, P, E]: the objective's text embeddings of its zero-shot prompts for `classes`."""
  tokens = np.asarray(objective.prompt_tokens(classes))
  num_classes, num_prompts, length = tokens.shape
  fns = _FEATURE_FNS.setdefault(objective, {})
  if "embed_text" not in fns:
    fns["embed_text"] = jax.jit(objective.embed_text)
  flat = fns["embed_text"](params, model_state, jnp.asarray(tokens.reshape(-1, length)))
  return np.asarray(flat, np.float32).reshape(num_classes, num_prompts, -1)


def zero_shot_accuracy(image_emb: np.ndarray, labels: np.ndarray, class_text_emb: np.ndarray
                       ) -> float:
  """Accuracy of zero-shot classification: image [N, E] vs class prompt embeddings [C, P, E]."""
  predicted = probes.zero_shot_classify(jnp.asarray(image_emb), jnp.asarray(class_text_emb))
  return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def retrieval_recalls(image_emb: np.ndarray, labels: np.ndarray, class_text_emb: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """{'i2t_r1': ..., 't2i_r1': ...}: Recall@k both ways; relevant = same class (see above)."""
  num_classes, num_prompts, dim = class_text_emb.shape
  text_emb = class_text_emb.reshape(num_classes * num_prompts, dim)
  text_labels = np.repeat(np.arange(num_classes), num_prompts)
  relevant = np.asarray(labels)[:, None] == text_labels[None, :]
  out = {}
  for direction, query, gallery, rel in (("i2t", image_emb, text_emb, relevant),
                                         ("t2i", text_emb, image_emb, relevant.T)):
    usable = [k for k in ks if k <= len(gallery)]
    recall = probes.retrieval_recall(jnp.asarray(query), jnp.asarray(gallery), jnp.asarray(rel),
                                     usable)
    out.update({f"{direction}_r{k}": recall[f"recall@{k}"] for k in usable})
  return out


class _Representation(Evaluator):
  """Shared: the objective-method check, `tag`, and collecting embeddings over a split."""

  NEEDS: tuple[str, ...] = ()
  OPTIONS = {"tag": None}

  def __init__(self, s, name, cfg):
    super().__init__(s, name, cfg)
    require(s.objective, self.needs(), type(self).TYPE)
    self.key_prefix = f"{self.prefix}/{self.options['tag']}" if self.options["tag"] else self.prefix
    self.make_batches, _ = split_batches(s, self.data_config, self.split, self.batch_size)

  def embeddings(self, method: str, make_batches: Callable, params: Any, model_state: Any
                 ) -> tuple[np.ndarray, np.ndarray]:
    out = collect(self.setup, _feature_fn(self.setup.objective, method), make_batches, params,
                  model_state)
    return out["x"].astype(np.float32), out["label"]

  def needs(self) -> tuple[str, ...]:
    """The objective methods this evaluator calls."""
    return self.NEEDS


class _FittedOnTrain(_Representation):
  """kNN and linear probe: a second, fitting split (`train_split` + `train_data` overrides)."""

  NEEDS = ("features",)
  OPTIONS = {**_Representation.OPTIONS, "train_split": None, "train_data": None,
             "input": "features"}
  INPUTS = ("features", "pixels")

  def __init__(self, s, name, cfg):
    super().__init__(s, name, cfg)
    train_config = ml_collections.ConfigDict({**self.data_config.to_dict(),
                                              **dict(self.options["train_data"] or {})})
    train_config.train_split = self.options["train_split"] or train_config.train_split
    self.train_config = train_config  # shots apply to its train split only
    self.make_train_batches, _ = split_batches(s, train_config, train_config.train_split,
                                               self.batch_size)
    self.num_classes = len(classes_of(self.data_config))

  def needs(self) -> tuple[str, ...]:
    if self.options["input"] not in self.INPUTS:  # checked here: needs() depends on it
      raise ConfigError(f"evals.{self.name}.input={self.options['input']!r}; choose 'features' "
                        "(the objective's encoder) or 'pixels' (the flattened input images)")
    return () if self.options["input"] == "pixels" else self.NEEDS

  def both_sides(self, params, model_state):
    method = self.options["input"]  # "features" (an objective method) or "pixels"
    return (*self.embeddings(method, self.make_train_batches, params, model_state),
            *self.embeddings(method, self.make_batches, params, model_state))


@register("knn")
class KNN(_FittedOnTrain):
  """Yields `<split>/knn_accuracy`; options k (20) and temperature (0.07)."""
  TYPE = "knn"
  OPTIONS = {**_FittedOnTrain.OPTIONS, "k": 20, "temperature": 0.07}

  def __init__(self, s, name, cfg):
    super().__init__(s, name, cfg)
    if not isinstance(self.options["k"], int) or self.options["k"] < 1:
      raise ConfigError(f"evals.{name}.k={self.options['k']!r} must be an integer >= 1")
    if not self.options["temperature"] > 0:
      raise ConfigError(f"evals.{name}.temperature must be > 0, got {self.options['temperature']}")

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    train_x, train_y, x, y = self.both_sides(params, model_state)
    yield f"{self.key_prefix}/knn_accuracy", knn_accuracy(
        train_x, train_y, x, y, num_classes=self.num_classes, k=self.options["k"],
        temperature=self.options["temperature"])


@register("linear_probe")
class LinearProbe(_FittedOnTrain):
  """Yields `<split>/linear_probe_accuracy`; method 'ridge' (l2) or 'softmax' (steps, lr, wd)."""
  TYPE = "linear_probe"
  OPTIONS = {**_FittedOnTrain.OPTIONS, "method": "ridge", "l2": 1e-3, "steps": 300, "lr": 0.05,
             "weight_decay": 1e-4}

  def __init__(self, s, name, cfg):
    super().__init__(s, name, cfg)
    if self.options["method"] not in ("ridge", "softmax"):
      raise ConfigError(f"evals.{name}.method={self.options['method']!r}; choose 'ridge' (closed "
                        "form) or 'softmax' (trained)")
    for key in ("l2", "lr"):
      if not self.options[key] > 0:
        raise ConfigError(f"evals.{name}.{key} must be > 0, got {self.options[key]!r}")

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    train_x, train_y, x, y = self.both_sides(params, model_state)
    o = self.options
    yield f"{self.key_prefix}/linear_probe_accuracy", linear_probe_accuracy(
        train_x, train_y, x, y, num_classes=self.num_classes, method=o["method"], l2=o["l2"],
        steps=int(o["steps"]), lr=o["lr"], weight_decay=o["weight_decay"])


class _ImageText(_Representation):
  NEEDS = ("embed_images", "embed_text", "prompt_tokens")
  OPTIONS = {**_Representation.OPTIONS, "chance": False}

  def image_and_class_text(self, params, model_state):
    image_emb, labels = self.embeddings("embed_images", self.make_batches, params, model_state)
    class_emb = class_text_embeddings(self.setup.objective, params, model_state,
                                      classes_of(self.data_config))
    return image_emb, labels, class_emb


@register("zero_shot")
class ZeroShot(_ImageText):
  """Yields `<split>/zero_shot_accuracy` through the objective's held-out prompts (with chance=True
  also `zero_shot_accuracy_chance`: 1/C, a uniform guess among the split's C classes)."""
  TYPE = "zero_shot"

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    image_emb, labels, class_emb = self.image_and_class_text(params, model_state)
    yield f"{self.key_prefix}/zero_shot_accuracy", zero_shot_accuracy(image_emb, labels, class_emb)
    if self.options["chance"]:
      yield f"{self.key_prefix}/zero_shot_accuracy_chance", 1.0 / len(class_emb)


@register("retrieval")
class Retrieval(_ImageText):
  """Yields `<split>/retrieval_{i2t,t2i}_r{k}` for k in `ks` (default 1, 5, 10); with chance=True
  also each `..._chance` (`retrieval_chance`)."""
  TYPE = "retrieval"
  OPTIONS = {**_ImageText.OPTIONS, "ks": (1, 5, 10)}

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    image_emb, labels, class_emb = self.image_and_class_text(params, model_state)
    for key, value in retrieval_recalls(image_emb, labels, class_emb, self.options["ks"]).items():
      yield f"{self.key_prefix}/retrieval_{key}", value
    if self.options["chance"]:
      num_classes, num_prompts, _ = class_emb.shape
      for key, value in retrieval_chance(labels, num_classes, num_prompts,
                                         self.options["ks"]).items():
        yield f"{self.key_prefix}/retrieval_{key}_chance", value
