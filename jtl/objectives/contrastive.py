"""SimCLR and SupCon: contrastive pretraining of a registry backbone on augmented views.

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
V random views of each image (`jtl.augment.views`, drawn inside the step from the step's rng, so a
resumed run sees the same views) go through the backbone and a projection MLP, and NT-Xent (eq. 1)
pulls the views of one image together against every other view of the global batch. SupCon (Khosla
et al. 2020, "Supervised Contrastive Learning", eq. 2 `out` / eq. 3 `in`) makes every view of the
same *class* a positive too. Losses come from `jtl.losses.contrastive`.

Conventions:
* The encoder is `models.build(config.model, num_classes=0).backbone`, owned directly, so the params
  are `params/backbone/...` and the BatchNorm statistics `model_state/batch_stats/backbone/...`
  exactly as in a supervised `Classifier`: a contrastive checkpoint is the `init_from` of a transfer
  run with no conversion (its `params/projection` and `params/online_probe` are ignored there).
* All B*V views go through the backbone as one batch, so BatchNorm statistics are over the global
  batch of views (SimCLR's global BN; under jit over a Mesh that is exact, not per device).
* Optional online linear probe (`params/online_probe`, as in SimCLR's code): a linear classifier on
  `stop_gradient(features)` of every view, trained with the labels alongside; its loss is added but
  cannot reach the encoder, and its accuracy is a train metric.
* Options: `config.contrastive` (see `default_config`) and `config.augment` (`jtl.augment`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jtl import accumulate, augment, losses, masks, models
from jtl import config as config_lib
from jtl.errors import ConfigError
from jtl.losses import contrastive as contrastive_losses
from jtl.objectives.base import Metrics, Objective, PyTree, apply_model

SUPCON_FORMS = ("out", "in")


def default_config() -> ml_collections.ConfigDict:
  """`config.contrastive`: every option, with defaults for the 8x8 digits."""
  return ml_collections.ConfigDict(dict(
      temperature=0.2,  # NT-Xent/SupCon temperature tau (SimCLR: 0.5 on CIFAR-10, 0.1 on ImageNet)
      num_views=2,  # augmented views per image (SimCLR: 2; SupCon: 2)
      projection_dims=(128, 64),  # projection MLP widths, relu between; the last is the output dim
      supcon_form="out",  # SupCon's eq. 2 ('out', the paper's choice) or eq. 3 ('in')
      online_probe=True,  # a linear probe on stop_gradient(features), trained with the labels
      probe_classes=None,  # classes of the online probe; None: config.model.num_classes
  ))


class ProjectionHead(nn.Module):
  """Dense layers `dense{i}` of the given widths with relu between them (none after the last)."""
  dims: Sequence[int]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.dims):
      if i:
        x = nn.relu(x)
      x = nn.Dense(width, name=f"dense{i}")(x)
    return x


class ContrastiveModel(nn.Module):
  """backbone -> features [N, D]; projection -> embeddings [N, E]; online probe -> logits."""
  backbone: nn.Module
  projection_dims: Sequence[int]
  probe_classes: int = 0

  def setup(self):
    self.projection = ProjectionHead(tuple(self.projection_dims))
    if self.probe_classes:
      self.online_probe = nn.Dense(self.probe_classes)

  def features(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Encoder features before the projection (what transfer and the probes use)."""
    return self.backbone(x, train=train).astype(jnp.float32)

  def __call__(self, x: jnp.ndarray, train: bool = False
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    features = self.features(x, train)
    embeddings = self.projection(features) if self.projection_dims else features
    logits = self.online_probe(jax.lax.stop_gradient(features)) if self.probe_classes else None
    return features, embeddings, logits


class Contrastive(Objective):
  """SimCLR (`supervised=False`, NT-Xent) or SupCon (`supervised=True`) on `{'image', 'label'}`.

  Labels are used by SupCon's loss and by the online probe only; SimCLR without a probe needs none.
  `from_config` builds the subclass's flavour (`SUPERVISED`).
  """

  SUPERVISED = False

  def __init__(self, backbone: nn.Module, augment_config: Mapping[str, Any], *,
               supervised: bool = False, temperature: float = 0.2, num_views: int = 2,
               projection_dims: Sequence[int] = (128, 64), supcon_form: str = "out",
               probe_classes: int = 0):
    self.model = ContrastiveModel(backbone, tuple(projection_dims), probe_classes)
    self.augment_config = dict(augment_config)
    self.supervised = supervised
    self.temperature = temperature
    self.num_views = num_views
    self.supcon_form = supcon_form

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Contrastive":
    """Validates `config.contrastive` and `config.augment` and builds the objective."""
    supervised = cls.SUPERVISED
    o = config_lib.section_options(config, "contrastive", default_config())
    config_lib.check_number(o["temperature"], "contrastive.temperature", low=0.0, low_open=True)
    config_lib.check_positive_int(o["num_views"], "contrastive.num_views",
                                  minimum=1 if supervised else 2)
    dims = tuple(o["projection_dims"] or ())
    for width in dims:
      config_lib.check_positive_int(width, "contrastive.projection_dims")
    if o["supcon_form"] not in SUPCON_FORMS:
      raise ConfigError(f"contrastive.supcon_form={o['supcon_form']!r} must be one of "
                        f"{SUPCON_FORMS} (eq. 2 / eq. 3 of Khosla et al.)")
    if not isinstance(o["online_probe"], bool):
      raise ConfigError(f"contrastive.online_probe must be True or False, got "
                        f"{o['online_probe']!r}")
    config_lib.check_positive_int(o["probe_classes"], "contrastive.probe_classes", allow_none=True)
    probe_classes = 0
    if o["online_probe"]:
      probe_classes = o["probe_classes"] or config.model.get("num_classes") or 0
      config_lib.check_positive_int(probe_classes,
                                    "model.num_classes (or contrastive.probe_classes, for the probe)")
    augment_config = config.get("augment") or {}
    augment.validate(augment_config)
    backbone = models.build(config.model, num_classes=0).backbone
    return cls(backbone, augment_config, supervised=supervised, temperature=o["temperature"],
               num_views=o["num_views"], projection_dims=dims, supcon_form=o["supcon_form"],
               probe_classes=probe_classes)

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    variables = self.model.init(rng, jnp.zeros_like(batch["image"][:1]), train=False)
    params = variables.pop("params")
    return params, dict(variables)

  def _loss_and_metrics(self, embeddings: jax.Array, labels: jax.Array | None
                        ) -> tuple[jax.Array, Metrics]:
    """The contrastive loss of embeddings [B, V, E] and the mean cosine similarity of positives."""
    if self.supervised:
      per_anchor, valid = contrastive_losses.supcon(embeddings, labels, self.temperature,
                                                    self.supcon_form)
      loss = contrastive_losses.masked_mean(per_anchor, valid)
    else:
      loss = jnp.mean(contrastive_losses.nt_xent(embeddings, self.temperature))
    unit = contrastive_losses.l2_normalize(embeddings)
    # Cosine similarity of view 0 with view 1 of the same image: rises as views align.
    alignment = jnp.sum(unit[:, 0] * unit[:, -1], axis=-1)
    return loss, {"view_alignment": jnp.mean(alignment)}

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    images = batch["image"]
    batch_size = images.shape[0]
    views = augment.views(images, jax.random.fold_in(rng, 0), self.augment_config, self.num_views)
    flat = views.reshape((batch_size * self.num_views,) + images.shape[1:])
    (_, embeddings, logits), model_state = apply_model(
        self.model, params, model_state, flat, train=True, trainable=trainable,
        rng=jax.random.fold_in(rng, 1))
    labels = batch.get("label")
    loss, metrics = self._loss_and_metrics(embeddings.reshape(batch_size, self.num_views, -1),
                                           labels)
    metrics["contrastive_loss"] = loss
    if logits is not None:
      view_labels = jnp.repeat(labels, self.num_views)  # flat is example-major: [b0v0, b0v1, ...]
      probe_loss = losses.softmax_cross_entropy(logits, view_labels).mean()
      metrics["probe_loss"] = probe_loss
      metrics["probe_accuracy"] = losses.accuracy(logits, view_labels).mean()
      loss = loss + probe_loss  # the probe sees stop_gradient(features): no effect on the encoder
    return loss, (model_state, metrics)

  def accumulated_gradients(self, trainable_params, frozen_params, model_state, batch, rng, *,
                            trainable, step, accum):
    """Gradient caching under `grad_accum_steps = accum` (Gao et al. 2021, "Scaling Deep Contrastive
    Learning Batch Size under Memory Limited Setup"): the loss of the WHOLE batch, every negative
    included, at the activation memory of one micro-batch.

    1. the views of the whole batch, drawn exactly as one un-accumulated step draws them;
    2. the embeddings of each micro-batch (rows i, i + k, ...) in a scan, no activations kept;
    3. the contrastive loss and its gradient with respect to the [B, V, E] embeddings;
    4. per micro-batch, one forward and backward pass of `sum(embeddings * their cotangent)` (plus
       the online probe's loss / k, a mean over examples), summed in `jtl.accumulate`'s scan.
    Without BatchNorm or dropout the gradient equals the un-accumulated one to float rounding;
    BatchNorm normalises each micro-batch by its own statistics (both passes alike), dropout draws
    per micro-batch. The model state merges as for every objective (jtl/objectives/base.py).
    """
    del step  # (no schedule)
    images, labels = batch["image"], batch.get("label")
    views = augment.views(images, jax.random.fold_in(rng, 0), self.augment_config, self.num_views)
    micro = accumulate.micro_batches({"views": views, **({"label": labels} if labels is not None
                                                          else {})}, accum)
    model_rng = jax.random.fold_in(rng, 1)
    loop_model = self.in_loop_body().model  # (traced inside both scans below)

    def forward(tp, part, index):
      """(embeddings [b, V, E], (probe loss, new state, probe accuracy)) of one micro-batch."""
      v = part["views"]
      flat = v.reshape((v.shape[0] * self.num_views,) + v.shape[2:])
      (_, embeddings, logits), new_state = apply_model(
          loop_model, masks.merge(tp, frozen_params), model_state, flat, train=True,
          trainable=trainable, rng=jax.random.fold_in(model_rng, index))
      probe = {}
      if logits is not None:
        view_labels = jnp.repeat(part["label"], self.num_views)
        probe = {"probe_loss": losses.softmax_cross_entropy(logits, view_labels).mean(),
                 "probe_accuracy": losses.accuracy(logits, view_labels).mean()}
      return embeddings.reshape(v.shape[0], self.num_views, -1), (probe, new_state)

    def embed(_, inputs):
      part, index = inputs
      return None, jax.lax.stop_gradient(forward(trainable_params, part, index)[0])
    _, micro_embeddings = jax.lax.scan(embed, None, (micro, jnp.arange(accum, dtype=jnp.int32)))
    k, b = micro_embeddings.shape[:2]
    # Micro-batch i holds rows i, i + k, ...: row j * k + i of the batch is [i, j].
    embeddings = micro_embeddings.swapaxes(0, 1).reshape((k * b,) + micro_embeddings.shape[2:])
    (loss, metrics), cotangent = jax.value_and_grad(self._loss_and_metrics, has_aux=True)(
        embeddings, labels)
    micro_cotangent = cotangent.reshape((b, k) + cotangent.shape[1:]).swapaxes(0, 1)

    def call(inputs, index):
      part, cot = inputs
      def surrogate(tp):
        embeddings, (probe, new_state) = forward(tp, part, index)
        value = jnp.sum(embeddings * cot) * accum  # (the scan divides by k)
        return value + probe.get("probe_loss", 0.0), (probe, new_state)
      grads, (probe, new_state) = jax.grad(surrogate, has_aux=True)(trainable_params)
      return grads, new_state, probe
    grads, new_state, probe_metrics = accumulate.scan_micro_batches(
        call, trainable_params, model_state, (micro, micro_cotangent), accum)
    metrics = {**metrics, "contrastive_loss": loss, **probe_metrics}
    total = loss + probe_metrics.get("probe_loss", 0.0)
    return grads, new_state, {"loss": total, **metrics}

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    """Per example: cosine similarity of two fixed augmented views' embeddings and, with the
    online probe, its loss and accuracy on the un-augmented image."""
    images = batch["image"]
    views = augment.views(images, jax.random.key(0), self.augment_config, 2)
    flat = views.reshape((2 * images.shape[0],) + images.shape[1:])
    (_, embeddings, _), _ = apply_model(self.model, params, model_state, flat, train=False)
    unit = contrastive_losses.l2_normalize(embeddings.reshape(images.shape[0], 2, -1))
    metrics = {"view_alignment": jnp.sum(unit[:, 0] * unit[:, 1], axis=-1)}
    if self.model.probe_classes:
      (_, _, logits), _ = apply_model(self.model, params, model_state, images, train=False)
      metrics["probe_loss"] = losses.softmax_cross_entropy(logits, batch["label"])
      metrics["probe_accuracy"] = losses.accuracy(logits, batch["label"])
    return metrics

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """Encoder (backbone) features [B, D] in inference mode, before the projection."""
    features, _ = apply_model(self.model, params, model_state, images, train=False,
                              method="features")
    return features

  def embed_images(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """Projection-head embeddings [B, E] in inference mode (the space the loss compares in)."""
    (_, embeddings, _), _ = apply_model(self.model, params, model_state, images, train=False)
    return embeddings


class SimCLR(Contrastive):
  """`objective="simclr"`: NT-Xent over augmented views; labels only feed the online probe."""
  SUPERVISED = False


class SupCon(Contrastive):
  """`objective="supcon"`: supervised contrastive loss; same-class views are positives."""
  SUPERVISED = True
