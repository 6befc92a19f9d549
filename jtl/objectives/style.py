"""Neural style transfer (`objective="style"`, Gatys, Ecker & Bethge 2016): the trained parameters are
the pixels of one image; the network is a frozen feature extractor.

Loss (eq. 7 of the paper, losses in `jtl.losses.style`):
  content_weight * L_content + style_weight * L_style + tv_weight * TV, with
  L_content = 1/2 sum (F^l - P^l)^2 on the content layer l (eq. 1),
  L_style = sum_l w_l E_l, E_l = 1 / (4 N_l^2 M_l^2) sum_ij (G^l_ij - A^l_ij)^2 (eqs. 3-5), where
  G^l = F^l F^l^T is the Gram matrix of the image's features at layer l (N_l filters, M_l = h * w
  positions) and A^l the style image's; TV the squared total variation of the image.
The paper's content:style ratio alpha / beta is 1e-3 to 1e-4; `style_weight` defaults to 1e3.

Conventions:
* Parameters: `params = {'image': [1, H, W, C], 'backbone': ...}` and `model_state = {'batch_stats':
  ...}`: the encoder is a registry model (`config.model`) built without a head, so below `params/`
  its paths are exactly a supervised run's `backbone/...`. `init_from.workdir=RUN` (or `.path=FILE`)
  loads it through the usual transfer path, with `init_from.dont_load = ('params/image',)`: the
  image is the one leaf the source does not have. The run's own head is reported unexpected and ignored.
* The encoder is frozen by the mask: `from_config` requires `config.trainable` to train
  `params/image` and nothing else (the config writes `(('params/image', True), ('.*', False))`),
  so the trainer differentiates the image alone (no backward pass into the encoder's weights, no
  optimizer state for them). The encoder always runs in inference mode (BatchNorm on its running
  statistics, which stay as loaded).
* Feature taps: flax's `capture_intermediates`, filtered to the `__call__` of the named modules
  (paths as in the params tree without `params/`, e.g. `backbone/stage2` of `cnn_small`,
  `backbone/stage2_block1` of a ResNet); any module called once whose output is `[B, h, w, N]`.
  Default layers (`default_layers`): every stage (SmallCNN) or every stage's last block (ResNet) for
  style, equal weights 1/L (the paper's w_l); the second-to-last of those for content.
* The content and style images (`style.content`, `style.style`: `DATASET@INDEX` or a file,
  `jtl.data.single_image`) are read on the host by `from_config`, preprocessed as the encoder's data
  (`config.data`: normalisation, size, channels); their features are recomputed in each step
  (from constants and the frozen weights). The image starts as the content image (`init='content'`)
  or as noise with the content's mean and standard deviation (`init='noise'`, the paper's white noise).
* The trainer's batch (of `config.data`) is not read: the trainer always draws one; a small
  `batch_size` keeps that cheap.
* Metrics: `loss`, `content_loss` (L_content), `style_loss` (L_style, both unweighted), `tv_loss`,
  and `style_loss/<layer>` (E_l). Eval metrics are the same values, repeated per example.
* Pictures: `jtl.pictures.style_transfer(config, workdir)` (called by `experiments.train` when the run ends) writes
  `plots/style_transfer.png`: content, style, and the image of every checkpoint.
"""
from __future__ import annotations

import difflib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from jtl import config as config_lib
from jtl import masks, models
from jtl.errors import ConfigError
from jtl.losses import style as style_losses
from jtl.models.resnet import ResNet
from jtl.models.small import SmallCNN
from jtl.objectives.base import Metrics, Objective, PyTree

IMAGE_RULES = (("params/image", True), (".*", False))
INITS = ("content", "noise")
PRETRAIN_HINT = ("train one with: python -m experiments.train "
                 "--config=experiments/configs/pretrain_digits.py --workdir=RUN")


def default_config() -> ml_collections.ConfigDict:
  """`config.style`: every option, with its default."""
  return ml_collections.ConfigDict(dict(
      content="sklearn_digits@0",  # DATASET@INDEX (train split) or an image file
      style="printed_digits@5",
      # a module path, e.g. 'backbone/stage2'; None: `default_layers`
      content_layer=config_dict.placeholder(str),
      # module paths (weights w_l = 1/L), or ((path, weight), ...); None: `default_layers`
      style_layers=config_dict.placeholder(object),
      content_weight=1.0,  # alpha of eq. 7
      style_weight=1e3,  # beta of eq. 7
      tv_weight=0.0,  # weight of the squared total variation (0: off, as in the paper)
      init="content",  # the starting image: 'content' or 'noise'
      random_encoder=False,  # True: no init_from needed, the encoder keeps its random init
  ))


def default_layers(model: nn.Module) -> tuple[str, tuple[str, ...]]:
  """(content layer, style layers) of a registered CNN (see the module docstring)."""
  backbone = getattr(model, "backbone", None)
  if isinstance(backbone, SmallCNN):
    style = tuple(f"backbone/stage{i + 1}" for i in range(len(backbone.widths)))
  elif isinstance(backbone, ResNet):
    style = tuple(f"backbone/stage{i + 1}_block{n - 1}" for i, n in enumerate(backbone.stage_sizes))
  else:
    raise ConfigError(f"no default style layers for a {type(backbone or model).__name__}; name them "
                      "(--config.style.content_layer, --config.style.style_layers)")
  return style[max(len(style) - 2, 0)], style


def tap_features(encoder: nn.Module, params: PyTree, model_state: PyTree, images: jax.Array,
                 layers: set[str] | tuple[str, ...]) -> dict[str, jax.Array]:
  """{layer: output} of the modules at `layers` (paths like `backbone/stage2`), the encoder in
  inference mode: flax's `capture_intermediates`, filtered to those modules' `__call__`. `params`
  may also hold the `image` or `decoder` of an objective (left out)."""
  wanted = set(layers)

  def keep(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and "/".join(module.path) in wanted
  encoder_params = {k: v for k, v in params.items() if k not in ("image", "decoder")}
  _, state = encoder.apply({"params": encoder_params, **model_state}, images, train=False,
                           capture_intermediates=keep, mutable=["intermediates"])
  # intermediates: {'backbone': {'stage2': {'__call__': (output,)}}}
  flat = {"/".join(str(getattr(k, "key", k)) for k in path[:-2]): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]}
  return {layer: flat[layer] for layer in wanted}


class StyleTransfer(Objective):
  """Optimises `params/image` so its features match a content image's and its Gram matrices a style
  image's, under a frozen encoder (`params/backbone`)."""

  def __init__(self, encoder: nn.Module, content: np.ndarray, style: np.ndarray, *,
               content_layer: str, style_layers: dict[str, float], content_weight: float = 1.0,
               style_weight: float = 1e3, tv_weight: float = 0.0, init: str = "content",
               captions: tuple[str, str] = ("content", "style")):
    self.encoder = encoder
    self.content = np.asarray(content, np.float32)[None]  # [1, H, W, C]
    self.style = np.asarray(style, np.float32)[None]
    self.content_layer = content_layer
    self.style_layers = dict(style_layers)
    self.content_weight, self.style_weight = float(content_weight), float(style_weight)
    self.tv_weight = float(tv_weight)
    self.init_mode = init
    self.captions = captions

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "StyleTransfer":
    """Validates `config.style`, the encoder source and the mask; reads both images (on the host)."""
    from jtl.data import single_image  # pylint: disable=g-import-not-at-top  (TensorFlow)
    o = config_lib.section_options(config, "style", default_config())
    for key in ("content_weight", "style_weight", "tv_weight"):
      config_lib.check_number(o[key], f"style.{key}", low=0.0)
    if o["init"] not in INITS:
      raise ConfigError(f"unknown style.init {o['init']!r}; use one of {', '.join(INITS)} "
                        "(--config.style.init)")
    init_from = config.get("init_from") or {}
    has_source = bool(init_from.get("workdir") or init_from.get("path"))
    if not has_source and not o["random_encoder"]:
      raise ConfigError("style transfer needs a trained encoder: set encoder=RUN (init_from.workdir) "
                        f"or a weights file ({PRETRAIN_HINT}), or --config.style.random_encoder=True "
                        "for an untrained one")
    if has_source and o["random_encoder"]:
      raise ConfigError("style.random_encoder=True but init_from also names an encoder; drop one")
    if o["random_encoder"]:
      logging.warning("style transfer with a RANDOMLY INITIALISED encoder (style.random_encoder): "
                      "its features are not trained on anything")
    encoder = models.build(config.model, num_classes=0)
    shape = data_shape(config.data)
    content, content_caption = single_image.load(o["content"], config.data, shape)
    style, style_caption = single_image.load(o["style"], config.data, shape)
    content_layer, style_layers = o["content_layer"], o["style_layers"]
    if content_layer is None or style_layers is None:
      default_content, default_style = default_layers(encoder)
      content_layer = content_layer or default_content
      style_layers = style_layers or default_style
    style_layers = _layer_weights(style_layers)
    objective = cls(encoder, content, style, content_layer=content_layer,
                    style_layers=dict(style_layers), content_weight=o["content_weight"],
                    style_weight=o["style_weight"], tv_weight=o["tv_weight"], init=o["init"],
                    captions=(content_caption, style_caption))
    objective.check_layers()
    objective.check_mask(config.trainable)
    return objective

  # --- checks on abstract shapes (nothing compiled) ---------------------------------------------

  def _abstract_variables(self) -> dict[str, Any]:
    return jax.eval_shape(lambda x: self.encoder.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct(self.content.shape, jnp.float32))

  def check_layers(self) -> None:
    """ConfigError unless every named layer is a module called once with a `[B, h, w, N]` output."""
    from jtl import explain  # pylint: disable=g-import-not-at-top  (matplotlib)
    outputs = explain.module_outputs(self.encoder, self._abstract_variables(),
                                     jax.ShapeDtypeStruct(self.content.shape, jnp.float32))
    maps = [path for path, shape in outputs.items() if len(shape) == 4]
    for layer in (self.content_layer, *self.style_layers):
      if len(outputs.get(layer, ())) != 4:
        close = difflib.get_close_matches(layer, maps, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"layer {layer!r} gives no [B, h, w, N] feature map{hint}; layers that do: "
                          f"{', '.join(maps)} (--config.style.content_layer/style_layers)")
    for layer, weight in self.style_layers.items():
      config_lib.check_number(weight, f"style.style_layers[{layer!r}]", low=0.0)

  def check_mask(self, rules: Any) -> None:
    """ConfigError unless `rules` train `params/image` and nothing else (the encoder is frozen)."""
    abstract = self._abstract_variables()
    params = {**abstract["params"], "image": jax.ShapeDtypeStruct(self.content.shape, jnp.float32)}
    mask = masks.trainable_mask(params, rules)
    trained = [p for p, t in zip(masks.leaf_paths(mask), jax.tree.leaves(mask)) if t]
    if trained != ["params/image"]:
      raise ConfigError(f"style transfer trains the image alone, but config.trainable trains "
                        f"{trained[:4] or 'nothing'}; set config.trainable = {IMAGE_RULES!r}")

  # --- model -------------------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    del batch  # the image's shape is the content image's
    encoder_rng, noise_rng = jax.random.split(rng)
    variables = self.encoder.init(encoder_rng, jnp.zeros_like(self.content), train=False)
    params = variables.pop("params")
    content = jnp.asarray(self.content)
    if self.init_mode == "noise":
      image = content.mean() + content.std() * jax.random.normal(noise_rng, content.shape)
    else:
      image = content
    return {**params, "image": image}, dict(variables)

  def layer_features(self, params: PyTree, model_state: PyTree, images: jax.Array
                     ) -> dict[str, jax.Array]:
    """{layer: [B, h, w, N]} at the content and style layers, encoder in inference mode."""
    return tap_features(self.encoder, params, model_state, images,
                        {self.content_layer, *self.style_layers})

  def losses(self, params: PyTree, model_state: PyTree) -> tuple[jax.Array, Metrics]:
    """(total loss, unweighted terms) of `params['image']` (eq. 7)."""
    targets = self.layer_features(params, model_state, jnp.concatenate([
        jnp.asarray(self.content), jnp.asarray(self.style)]))
    image = params["image"]
    feats = self.layer_features(params, model_state, image)
    content = style_losses.content_loss(feats[self.content_layer],
                                        targets[self.content_layer][:1])[0]
    per_layer = {layer: style_losses.style_layer_loss(
        feats[layer], style_losses.gram_matrix(targets[layer][1:])[0])[0]
        for layer in self.style_layers}
    style = sum(self.style_layers[layer] * e for layer, e in per_layer.items())
    tv = style_losses.total_variation(image)[0]
    total = self.content_weight * content + self.style_weight * style + self.tv_weight * tv
    metrics = {"content_loss": content, "style_loss": style, "tv_loss": tv,
               **{f"style_loss/{layer}": e for layer, e in per_layer.items()}}
    return total, metrics

  def loss(self, params, model_state, batch, rng, *, trainable):
    del batch, rng, trainable  # the image is the model; the encoder's mask is checked in from_config
    total, metrics = self.losses(params, model_state)
    return total, (model_state, metrics)

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    total, metrics = self.losses(params, model_state)
    rows = jax.tree.leaves(batch)[0].shape[0]
    return {k: jnp.full((rows,), v) for k, v in {"loss": total, **metrics}.items()}


def _layer_weights(layers: Any) -> dict[str, float]:
  """`style_layers` as {path: w_l}: a path or paths (w_l = 1/L each), or (path, weight) pairs."""
  if isinstance(layers, str):
    layers = (layers,)
  if isinstance(layers, (dict, ml_collections.ConfigDict)):
    return {str(k): v for k, v in layers.items()}
  layers = tuple(layers)
  if layers and all(isinstance(row, (tuple, list)) and len(row) == 2 for row in layers):
    return {str(path): weight for path, weight in layers}
  if not layers or not all(isinstance(path, str) for path in layers):
    raise ConfigError(f"style.style_layers {layers!r} is not a module path, paths, or (path, weight) "
                      "pairs; fix --config.style.style_layers")
  return {path: 1.0 / len(layers) for path in layers}


def data_shape(data_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the encoder's data: what its images look like after preprocessing."""
  from jtl.data import source  # pylint: disable=g-import-not-at-top  (TensorFlow)
  c = source.validate(data_config)
  height, width, channels = source.get_builder(c).info.features["image"].shape
  if c.image_size:
    height = width = c.image_size
  if not height or not width:
    raise ConfigError(f"{c.name} has images of varying size; set --config.data.image_size")
  return int(height), int(width), int(channels)
