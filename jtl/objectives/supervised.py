"""Supervised classification: the objective behind pretraining, training from scratch, linear probing
and (partial/full) fine-tuning. Which of those it is depends only on the mask and `init_from`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jtl import losses, masks, models
from jtl.models import layers
from jtl.objectives.base import Metrics, Objective, PyTree


def apply_model(model: nn.Module, params: PyTree, model_state: PyTree, x: jax.Array, *,
                train: bool, trainable: PyTree | None = None, rng: jax.Array | None = None,
                method: Any = None) -> tuple[jax.Array, PyTree]:
  """Runs `model`; in training, BatchNorms whose parameters are all frozen use and keep running stats.

  Returns `(output, new_model_state)`. Shared by every objective that trains a linen model.
  """
  frozen = masks.frozen_modules(trainable) if (train and trainable is not None) else frozenset()
  variables = {"params": params, **model_state}
  rngs = {"dropout": rng} if rng is not None else None
  with layers.frozen_norms(frozen):
    if train and model_state:
      out, new_state = model.apply(variables, x, train=True, rngs=rngs, method=method,
                                   mutable=list(model_state))
      return out, {**model_state, **new_state}
    return model.apply(variables, x, train=train, rngs=rngs, method=method), model_state


class Supervised(Objective):
  """Softmax cross-entropy on `batch = {'image': [B,...], 'label': [B]}`."""

  def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
    self.model = model
    self.label_smoothing = label_smoothing

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Supervised":
    return cls(models.build(config.model), config.get("label_smoothing", 0.0))

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    variables = self.model.init(rng, jnp.zeros_like(batch["image"][:1]), train=False)
    params = variables.pop("params")
    return params, dict(variables)

  def loss(self, params, model_state, batch, rng, *, trainable):
    logits, model_state = apply_model(self.model, params, model_state, batch["image"], train=True,
                                      trainable=trainable, rng=rng)
    loss = losses.softmax_cross_entropy(logits, batch["label"], self.label_smoothing).mean()
    return loss, (model_state, {"accuracy": losses.accuracy(logits, batch["label"]).mean()})

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    logits, _ = apply_model(self.model, params, model_state, batch["image"], train=False)
    return {"loss": losses.softmax_cross_entropy(logits, batch["label"]),
            "accuracy": losses.accuracy(logits, batch["label"])}
