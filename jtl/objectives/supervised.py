"""Supervised classification: the objective behind pretraining, training from scratch, linear probing
and (partial/full) fine-tuning. Which of those it is depends only on the mask and `init_from`; with
`config.lora.rank > 0` the model carries LoRA adapters (jtl/lora.py)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jtl import lora, losses, models
from jtl.objectives import labels
from jtl.objectives.base import Metrics, Objective, PyTree, apply_model


class Supervised(Objective):
  """Softmax cross-entropy on `batch = {'image': [B,...], 'label': [B]}`."""

  def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
    self.model = model
    self.label_smoothing = label_smoothing

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Supervised":
    labels.check_head_fits_labels(config, config.model.get("num_classes"))
    model = models.build(config.model)
    if lora.enabled(config):  # adapters on the kernels config.lora.rules selects
      model = lora.wrap(model, config.lora)
    return cls(model, config.get("label_smoothing", 0.0))

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    variables = self.model.init(rng, jnp.zeros_like(batch["image"][:1]), train=False)
    params = variables.pop("params")
    return params, dict(variables)

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    logits, model_state = apply_model(self.model, params, model_state, batch["image"], train=True,
                                      trainable=trainable, rng=rng)
    loss = losses.softmax_cross_entropy(logits, batch["label"], self.label_smoothing).mean()
    return loss, (model_state, {"accuracy": losses.accuracy(logits, batch["label"]).mean()})

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    logits, _ = apply_model(self.model, params, model_state, batch["image"], train=False)
    return {"loss": losses.softmax_cross_entropy(logits, batch["label"]),
            "accuracy": losses.accuracy(logits, batch["label"])}

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """The backbone's pooled features [B, D] in inference mode (what kNN and linear probes read)."""
    features, _ = apply_model(self.model, params, model_state, images, train=False,
                              method="features")
    return features
