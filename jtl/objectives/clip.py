"""CLIP and SigLIP: two towers (a registry image backbone + projection, a small text transformer)
trained to match images with their captions.

Losses (`jtl.losses.contrastive`): `config.clip.loss = "softmax"` is CLIP's symmetric cross-entropy
(Radford et al. 2021, Fig. 3) with a learnable log logit scale `params/log_scale` (init log(1/0.07),
clamped to [0, log 100] inside the loss); `"sigmoid"` is SigLIP (Zhai et al. 2023, Algorithm 1) with
learnable `params/log_t` and `params/bias` (paper init log 10 and -10), averaged over image rows;
`config.clip.chunked=True` computes it in the ring-chunked form (Sec. 3.3) over the batch's mesh
axis.

Captions, and why on device: the "dataset" is the digits plus the caption templates of `jtl.text`.
The objective holds a [T, C, L] token table (training templates x the dataset's classes) and draws
one template per example from the step rng, so every epoch pairs an image with a fresh phrasing (12
captions per image instead of one frozen pairing), the data pipeline stays the plain image/label
pipeline (nothing to build or cache), and resume is exact because the draw is keyed by the step.
A batch that carries its own `tokens` (int32 [B, L], e.g. from a TFDS captions set) is used as is.
Captions describe a class, so two images of one class in a batch have interchangeable captions;
both losses still count the other one as a negative (the usual false negatives of CLIP batches).

Params: `params/backbone` (same paths as a supervised Classifier's, so `init_from` of a transfer run
takes it), `params/projection` (image side), `params/text/...` (text tower, see
`jtl.models.text`), and the loss's scalars. Zero-shot prompts come from the held-out templates.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jtl import accumulate, augment, masks, models, sharding
from jtl import config as config_lib
from jtl import data as data_lib
from jtl import text as tokenizer
from jtl.errors import ConfigError
from jtl.losses import contrastive as contrastive_losses
from jtl.models.text import TextTransformer, build_text_tower
from jtl.objectives.base import Metrics, Objective, PyTree, apply_model

LOSSES = ("softmax", "sigmoid")


def default_config() -> ml_collections.ConfigDict:
  """`config.clip`: every option, with defaults for the 8x8 digits."""
  return ml_collections.ConfigDict(dict(
      loss="softmax",  # 'softmax' (CLIP) or 'sigmoid' (SigLIP)
      chunked=False,  # SigLIP only: the ring-chunked loss (O(B_local^2) memory per device)
      embed_dim=64,  # joint embedding dimension of both towers
      max_len=8,  # caption length in tokens (with EOS), >= the longest template's
      text_width=64,
      text_depth=2,
      text_heads=4,
      text_mlp_ratio=4,
      text_pooling="eos",  # 'eos' (CLIP) or 'mean' over real tokens
      init_log_scale=math.log(1 / 0.07),  # CLIP: logit scale 1/0.07
      init_log_t=math.log(10.0),  # SigLIP: t' = log 10
      init_bias=-10.0,  # SigLIP: b = -10
      train_templates=tokenizer.TRAIN_TEMPLATES,  # indices into jtl.text.TEMPLATES
      held_out_templates=tokenizer.HELD_OUT_TEMPLATES,  # the zero-shot / retrieval prompts
      augment_images=True,  # one random view of each image (config.augment) per step
  ))


class CLIPModel(nn.Module):
  """Image tower (backbone + `projection`), text tower (`text`) and the loss's scalars."""
  backbone: nn.Module
  text: TextTransformer
  embed_dim: int
  loss_type: str = "softmax"
  init_log_scale: float = math.log(1 / 0.07)
  init_log_t: float = math.log(10.0)
  init_bias: float = -10.0

  def setup(self):
    self.projection = nn.Dense(self.embed_dim, use_bias=False)
    constant = lambda value: lambda key, shape: jnp.full(shape, value, jnp.float32)  # noqa: E731
    if self.loss_type == "softmax":
      self.log_scale = self.param("log_scale", constant(self.init_log_scale), ())
    else:
      self.log_t = self.param("log_t", constant(self.init_log_t), ())
      self.bias = self.param("bias", constant(self.init_bias), ())

  def features(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    return self.backbone(images, train=train).astype(jnp.float32)

  def embed_images(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    return self.projection(self.features(images, train))

  def embed_text(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no dropout or BatchNorm in the text tower
    return self.text(tokens)

  @property
  def scalars_names(self) -> tuple[str, ...]:
    """The loss's learnable scalars (top-level params)."""
    return ("log_scale",) if self.loss_type == "softmax" else ("log_t", "bias")

  def scalars(self) -> dict[str, jnp.ndarray]:
    if self.loss_type == "softmax":
      return {"log_scale": self.log_scale}
    return {"log_t": self.log_t, "bias": self.bias}

  def __call__(self, inputs: tuple[jnp.ndarray, jnp.ndarray], train: bool = False
               ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    images, tokens = inputs
    return self.embed_images(images, train), self.embed_text(tokens), self.scalars()


class CLIP(Objective):
  """`objective="clip"`: CLIP (`loss="softmax"`) or SigLIP (`loss="sigmoid"`) on image/label."""

  def __init__(self, model: CLIPModel, classes: Sequence[int], *, train_templates: Sequence[int],
               held_out_templates: Sequence[int], max_len: int, augment_config: Any = None,
               chunked_mesh: jax.sharding.Mesh | None = None, chunked_axis: str = "data"):
    self.model = model
    self.classes = tuple(int(c) for c in classes)
    self.max_len = max_len
    self.held_out_templates = tuple(held_out_templates)
    self.train_table = tokenizer.caption_table(train_templates, self.classes, max_len)  # [T, C, L]
    self.augment_config = None if augment_config is None else dict(augment_config)
    self.chunked_mesh, self.chunked_axis = chunked_mesh, chunked_axis

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CLIP":
    """Validates `config.clip` (and `config.augment` if used) and builds the objective."""
    o = config_lib.section_options(config, "clip", default_config())
    if o["loss"] not in LOSSES:
      raise ConfigError(f"unknown clip.loss {o['loss']!r}; choose 'softmax' (CLIP) or 'sigmoid' "
                        "(SigLIP) (--config.clip.loss)")
    for key in ("chunked", "augment_images"):
      if not isinstance(o[key], bool):
        raise ConfigError(f"clip.{key} must be True or False, got {o[key]!r}")
    if o["chunked"] and o["loss"] != "sigmoid":
      raise ConfigError("clip.chunked=True needs clip.loss='sigmoid' (only SigLIP has a chunked "
                        "form); set --config.clip.loss=sigmoid or --config.clip.chunked=False")
    for key in ("init_log_scale", "init_log_t", "init_bias"):
      value = o[key]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"clip.{key} must be a finite number, got {value!r}")
    for key in ("train_templates", "held_out_templates"):
      for t in tuple(o[key] or ()):
        config_lib.check_positive_int(t, f"clip.{key}", minimum=0)
    text_tower = build_text_tower(
        embed_dim=o["embed_dim"], max_len=o["max_len"], width=o["text_width"],
        depth=o["text_depth"], heads=o["text_heads"], mlp_ratio=o["text_mlp_ratio"],
        pooling=o["text_pooling"])
    augment_config = None
    if o["augment_images"]:
      augment_config = config.get("augment") or {}
      augment.validate(augment_config)
    classes = config.data.labels or tuple(range(data_lib.num_classes(config.data)))
    mesh, axis = None, "data"
    if o["chunked"]:
      mesh = sharding.make_mesh(config.mesh)
      axes = [a for a in config.mesh.batch_axes if a in mesh.axis_names]
      if len(axes) != 1:
        raise ConfigError(f"clip.chunked needs the batch split over exactly one mesh axis, got "
                          f"{axes} (mesh.batch_axes={tuple(config.mesh.batch_axes)})")
      axis = axes[0]
    model = CLIPModel(models.build(config.model, num_classes=0).backbone, text_tower,
                      o["embed_dim"], o["loss"], float(o["init_log_scale"]),
                      float(o["init_log_t"]), float(o["init_bias"]))
    return cls(model, classes, train_templates=tuple(o["train_templates"]),
               held_out_templates=tuple(o["held_out_templates"]), max_len=o["max_len"],
               augment_config=augment_config, chunked_mesh=mesh, chunked_axis=axis)

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    tokens = jnp.zeros((1, self.max_len), jnp.int32)
    variables = self.model.init(rng, (jnp.zeros_like(batch["image"][:1]), tokens), train=False)
    params = variables.pop("params")
    return params, dict(variables)

  def captions(self, labels: jax.Array, rng: jax.Array) -> jax.Array:
    """int32 [B, L]: for each example, its class's caption under a training template drawn from
    `rng` (one uniform template per example; a function of (rng, position in the global batch))."""
    template = jax.random.randint(rng, labels.shape, 0, self.train_table.shape[0])
    return jnp.asarray(self.train_table)[template, labels]

  def pair_loss(self, image_emb: jax.Array, text_emb: jax.Array, scalars: dict[str, jax.Array]
                ) -> jax.Array:
    """The mean CLIP or SigLIP loss of B matching (image, text) pairs."""
    if self.model.loss_type == "softmax":
      return jnp.mean(contrastive_losses.clip_loss(image_emb, text_emb, scalars["log_scale"]))
    if self.chunked_mesh is not None:
      rows = contrastive_losses.siglip_loss_chunked(image_emb, text_emb, scalars["log_t"],
                                                    scalars["bias"], mesh=self.chunked_mesh,
                                                    axis=self.chunked_axis)
    else:
      rows = contrastive_losses.siglip_loss(image_emb, text_emb, scalars["log_t"], scalars["bias"])
    return jnp.mean(rows)

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    images, labels = batch["image"], batch["label"]
    if self.augment_config is not None:
      images = augment.augment(images, jax.random.fold_in(rng, 0), self.augment_config)
    tokens = batch["tokens"] if "tokens" in batch else self.captions(labels,
                                                                     jax.random.fold_in(rng, 1))
    (image_emb, text_emb, scalars), model_state = apply_model(
        self.model, params, model_state, (images, tokens), train=True, trainable=trainable,
        rng=jax.random.fold_in(rng, 2))
    loss = self.pair_loss(image_emb, text_emb, scalars)
    # In-batch image->text top-1, counting any caption of the right class as right.
    sims = contrastive_losses.l2_normalize(image_emb) @ contrastive_losses.l2_normalize(text_emb).T
    hit = labels[jnp.argmax(sims, axis=1)] == labels
    metrics = {"batch_i2t_accuracy": jnp.mean(hit.astype(jnp.float32)),
               **{k: v.astype(jnp.float32) for k, v in scalars.items()}}
    return loss, (model_state, metrics)

  def accumulated_gradients(self, trainable_params, frozen_params, model_state, batch, rng, *,
                            trainable, step, accum):
    """Gradient caching under `grad_accum_steps = accum` (as `Contrastive.accumulated_gradients`):
    the CLIP/SigLIP loss of the whole batch, every negative included, at the activation memory of
    one micro-batch. Images are augmented and captions drawn for the whole batch exactly as one
    un-accumulated step does; both towers embed each micro-batch in a scan without keeping
    activations; the loss gradient w.r.t. all image and text embeddings and the loss's scalars is
    taken on the whole batch; one forward and backward pass per micro-batch then carries it into the
    towers. Equal to one step on the whole batch without BatchNorm or dropout."""
    del step  # (no schedule)
    images, labels = batch["image"], batch["label"]
    if self.augment_config is not None:
      images = augment.augment(images, jax.random.fold_in(rng, 0), self.augment_config)
    tokens = batch["tokens"] if "tokens" in batch else self.captions(labels,
                                                                     jax.random.fold_in(rng, 1))
    micro = accumulate.micro_batches({"image": images, "tokens": tokens}, accum)
    model_rng = jax.random.fold_in(rng, 2)
    loop_model = self.in_loop_body().model  # (traced inside both scans below)

    def forward(tp, part, index):
      return apply_model(loop_model, masks.merge(tp, frozen_params), model_state,
                         (part["image"], part["tokens"]), train=True, trainable=trainable,
                         rng=jax.random.fold_in(model_rng, index))

    def embed(_, inputs):
      part, index = inputs
      (image_emb, text_emb, _), _ = forward(trainable_params, part, index)
      return None, jax.lax.stop_gradient((image_emb, text_emb))
    _, (micro_image, micro_text) = jax.lax.scan(embed, None,
                                                (micro, jnp.arange(accum, dtype=jnp.int32)))

    def whole(x):  # [k, b, E] -> [B, E]: micro-batch i holds rows i, i + k, ...
      return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])

    def split(x):  # [B, E] -> [k, b, E]
      return x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1)
    scalars = {k: masks.merge(trainable_params, frozen_params)[k] for k in self.model.scalars_names}
    image_emb, text_emb = whole(micro_image), whole(micro_text)
    loss, (d_image, d_text, _) = jax.value_and_grad(self.pair_loss, argnums=(0, 1, 2))(
        image_emb, text_emb, scalars)

    def call(inputs, index):
      part, cot_image, cot_text = inputs
      def surrogate(tp):
        (micro_image_emb, micro_text_emb, own_scalars), new_state = forward(tp, part, index)
        value = jnp.sum(micro_image_emb * cot_image) + jnp.sum(micro_text_emb * cot_text)
        # The loss's scalars get their gradient from the whole batch's loss, once per step (each
        # of the k calls adds it, the scan divides by k); the embeddings are constants there.
        return value * accum + self.pair_loss(image_emb, text_emb, own_scalars), new_state
      grads, new_state = jax.grad(surrogate, has_aux=True)(trainable_params)
      return grads, new_state, {}
    grads, new_state, _ = accumulate.scan_micro_batches(
        call, trainable_params, model_state, (micro, split(d_image), split(d_text)), accum)
    sims = contrastive_losses.l2_normalize(image_emb) @ contrastive_losses.l2_normalize(text_emb).T
    hit = labels[jnp.argmax(sims, axis=1)] == labels
    metrics = {"loss": loss, "batch_i2t_accuracy": jnp.mean(hit.astype(jnp.float32)),
               **{k: v.astype(jnp.float32) for k, v in scalars.items()}}
    return grads, new_state, metrics

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    """Per example: zero-shot correctness with the held-out prompts of the objective's classes."""
    class_emb = self.embed_text(params, model_state, jnp.asarray(
        self.prompt_tokens(self.classes)).reshape(-1, self.max_len))
    class_emb = contrastive_losses.l2_normalize(class_emb.reshape(
        len(self.classes), -1, class_emb.shape[-1]))
    class_emb = contrastive_losses.l2_normalize(jnp.mean(class_emb, axis=1))
    image_emb = contrastive_losses.l2_normalize(self.embed_images(params, model_state,
                                                                  batch["image"]))
    predicted = jnp.argmax(image_emb @ class_emb.T, axis=1)
    return {"zero_shot_accuracy": (predicted == batch["label"]).astype(jnp.float32)}

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """Image backbone features [B, D] (before the projection), inference mode."""
    out, _ = apply_model(self.model, params, model_state, images, train=False, method="features")
    return out

  def embed_images(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """Image embeddings [B, E] in the joint space (not normalised)."""
    out, _ = apply_model(self.model, params, model_state, images, train=False,
                         method="embed_images")
    return out

  def embed_text(self, params: PyTree, model_state: PyTree, tokens: jax.Array) -> jax.Array:
    """Text embeddings [B, E] of tokens int32 [B, L] in the joint space (not normalised)."""
    out, _ = apply_model(self.model, params, model_state, tokens, train=False, method="embed_text")
    return out

  def prompt_tokens(self, classes: Sequence[int]) -> np.ndarray:
    """int32 [C, P, L]: the held-out templates' captions for dataset classes `classes` (0..9)."""
    table = tokenizer.caption_table(self.held_out_templates, classes, self.max_len)  # [P, C, L]
    return np.swapaxes(table, 0, 1)
