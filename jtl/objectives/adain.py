"""Fast, feed-forward style transfer (`objective="adain"`): a decoder trained to invert a frozen encoder
through adaptive instance normalisation (Huang & Belongie 2017, "Arbitrary Style Transfer in Real-time
with Adaptive Instance Normalization", ICCV, Sec. 5-6).

For content images c and style images s (one of each per pair, batch members `content` and `style` of
a data mixture): t = AdaIN(f(c), f(s)) (eq. 8: f(c)'s channel statistics replaced by f(s)'s, at the
encoder layer `adain.layer`), the result g(t) is the decoder's output, and the loss (eqs. 11-13) is
  L_c + style_weight * L_s,   L_c = mean over elements of (f(g(t)) - t)^2 at `adain.layer`,
  L_s = sum_i ||mu(phi_i(g(t))) - mu(phi_i(s))||_2 + ||sigma(phi_i(g(t))) - sigma(phi_i(s))||_2
over the style layers phi_i (`jtl.losses.style.moment_loss`), averaged over the batch. (The paper's
L_c is a Euclidean distance; the mean of squares keeps its scale independent of the layer's size.)

Conventions (as `jtl.objectives.style`): `params = {'backbone': ..., 'decoder': ...}`; the encoder is
a registry model without its head, loaded with `init_from` (`dont_load = ('params/decoder/.*',)`) and
frozen by the mask, which must train `params/decoder/...` only; it runs in inference mode. Layers are
module paths (`backbone/stage2`); by default the decoder inverts `jtl.objectives.style.default_layers`'
content layer and the style layers are every default style layer up to it (the paper: relu1_1 to
relu4_1, the last being the AdaIN layer). The decoder (`Decoder`) mirrors the encoder's resolution:
3x3 conv + ReLU blocks with nearest-neighbour 2x upsampling until the input's size, then a 3x3 conv to
the image's channels (no normalisation layers, as in the paper). Metrics: `content_loss`,
`style_loss`. When the run ends, `plots/adain.png` shows content x style pairs decoded (`jtl.pictures.adain`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jtl import config as config_lib
from jtl import masks, models
from jtl.errors import ConfigError
from jtl.losses import style as style_losses
from jtl.objectives.base import Metrics, Objective, PyTree
from jtl.objectives.style import default_layers, tap_features

DECODER_RULES = (("params/decoder/.*", True), (".*", False))


def default_config() -> ml_collections.ConfigDict:
  """`config.adain`: every option, with its default."""
  return ml_collections.ConfigDict(dict(
      layer=config_dict.placeholder(str),  # the AdaIN layer; None: the default content layer
      style_layers=config_dict.placeholder(object),  # None: default style layers up to `layer`
      # lambda of eq. 11 (the paper: 0.01 to 10, with a summed L_c); 0.1 keeps the digit legible
      style_weight=0.1,
      width=64,  # the decoder's channels
  ))


class Decoder(nn.Module):
  """Feature map [B, h, w, N] -> image [B, h * 2^upsamples, w * 2^upsamples, channels]."""
  channels: int
  upsamples: int
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(self.width, (3, 3), name="conv_in")(x))
    for i in range(self.upsamples):
      b, h, w, n = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, n), "nearest")
      x = nn.relu(nn.Conv(self.width, (3, 3), name=f"conv_up{i}")(x))
    return nn.Conv(self.channels, (3, 3), name="conv_out")(x)


class AdaIN(Objective):
  """Trains `params/decoder` so that decoding AdaIN(f(content), f(style)) gives an image whose
  features are those AdaIN targets and whose feature statistics are the style's."""

  def __init__(self, encoder: nn.Module, *, layer: str, style_layers: tuple[str, ...],
               image_shape: tuple[int, int, int], feature_shape: tuple[int, int, int],
               style_weight: float = 0.1, width: int = 64):
    self.encoder, self.layer, self.style_layers = encoder, layer, tuple(style_layers)
    self.image_shape, self.style_weight = tuple(image_shape), float(style_weight)
    upsamples = math.log2(image_shape[0] / feature_shape[0])
    if upsamples != int(upsamples) or image_shape[0] / feature_shape[0] != \
        image_shape[1] / feature_shape[1]:
      raise ConfigError(f"layer {layer!r} maps {image_shape} images to {feature_shape}; the decoder "
                        "needs a power-of-two downsampling: pick another --config.adain.layer")
    self.decoder = Decoder(channels=image_shape[2], upsamples=int(upsamples), width=int(width))
    self.feature_shape = tuple(feature_shape)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "AdaIN":
    """Validates `config.adain`, the batch layout (members `content` and `style`) and the mask."""
    from jtl import explain  # pylint: disable=g-import-not-at-top  (matplotlib)
    from jtl.objectives import style as style_objective  # pylint: disable=g-import-not-at-top
    o = config_lib.section_options(config, "adain", default_config())
    config_lib.check_number(o["style_weight"], "adain.style_weight", low=0.0)
    config_lib.check_positive_int(o["width"], "adain.width")
    if sorted(config.data.get("mixture") or {}) != ["content", "style"]:
      raise ConfigError("adain needs data.mixture members 'content' and 'style' (got "
                        f"{sorted(config.data.get('mixture') or {})}); set --config.data.mixture")
    init_from = config.get("init_from") or {}
    if not (init_from.get("workdir") or init_from.get("path")):
      raise ConfigError("adain needs a trained encoder: set encoder=RUN "
                        f"({style_objective.PRETRAIN_HINT})")
    encoder = models.build(config.model, num_classes=0)
    shape = style_objective.data_shape(config.data)
    default_content, default_style = default_layers(encoder)
    layer = o["layer"] or default_content
    example = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), example)
    outputs = explain.module_outputs(encoder, variables, example)
    if o["style_layers"] is None:
      order = list(outputs)
      style_layers = tuple(s for s in default_style
                           if s in order and layer in order and order.index(s) <= order.index(layer))
    else:
      style_layers = (o["style_layers"],) if isinstance(o["style_layers"], str) else tuple(
          o["style_layers"])
    maps = [p for p, s in outputs.items() if len(s) == 4]
    for name in (layer, *style_layers):
      if name not in maps:
        raise ConfigError(f"layer {name!r} gives no [B, h, w, N] feature map; layers that do: "
                          f"{', '.join(maps)} (--config.adain.layer/style_layers)")
    objective = cls(encoder, layer=layer, style_layers=style_layers, image_shape=shape,
                    feature_shape=outputs[layer][1:], style_weight=o["style_weight"],
                    width=o["width"])
    params = {**variables["params"], "decoder": jax.eval_shape(
        objective.decoder.init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, *outputs[layer][1:]), jnp.float32))["params"]}
    mask = masks.trainable_mask(params, config.trainable)
    trained = {p for p, t in zip(masks.leaf_paths(mask), jax.tree.leaves(mask)) if t}
    if not trained or not all(p.startswith("params/decoder/") for p in trained):
      raise ConfigError("adain trains the decoder alone; set config.trainable = "
                        f"{DECODER_RULES!r}")
    return objective

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    del batch
    encoder_rng, decoder_rng = jax.random.split(rng)
    variables = self.encoder.init(encoder_rng, jnp.zeros((1, *self.image_shape)), train=False)
    params = variables.pop("params")
    decoder = self.decoder.init(decoder_rng, jnp.zeros((1, *self.feature_shape)))["params"]
    return {**params, "decoder": decoder}, dict(variables)

  def _features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> dict[str, Any]:
    return tap_features(self.encoder, params, model_state, images, {self.layer, *self.style_layers})

  def stylise(self, params: PyTree, model_state: PyTree, content: jax.Array, style: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """(g(t), t): the stylised images and the AdaIN targets, one per (content, style) pair."""
    t = style_losses.adain(self._features(params, model_state, content)[self.layer],
                           self._features(params, model_state, style)[self.layer])
    return self.decoder.apply({"params": params["decoder"]}, t), t

  def losses(self, params: PyTree, model_state: PyTree, batch: PyTree) -> tuple[jax.Array, Metrics]:
    content, style = batch["content"]["image"], batch["style"]["image"]
    rows = min(content.shape[0], style.shape[0])
    content, style = content[:rows], style[:rows]
    result, t = self.stylise(params, model_state, content, style)
    of_result = self._features(params, model_state, result)
    of_style = self._features(params, model_state, style)
    content_loss = jnp.mean(jnp.square(of_result[self.layer] - t).reshape(rows, -1), axis=-1)
    style_loss = sum(style_losses.moment_loss(of_result[name], of_style[name])
                     for name in self.style_layers)
    total = content_loss + self.style_weight * style_loss
    return total, {"content_loss": content_loss, "style_loss": style_loss}

  def loss(self, params, model_state, batch, rng, *, trainable):
    del rng, trainable
    total, metrics = self.losses(params, model_state, batch)
    return jnp.mean(total), (model_state, {k: jnp.mean(v) for k, v in metrics.items()})

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    if not {"content", "style"} <= set(batch):  # the evaluator hands over one member at a time
      raise ConfigError("an adain run has no per-split evaluation (its losses need a content and a "
                        "style batch together); see train_metrics.jsonl and plots/adain.png")
    total, metrics = self.losses(params, model_state, batch)
    return {"loss": total, **metrics}
