"""Class-discriminative saliency maps: Grad-CAM and CAM, batched and jit-compiled, plus a PNG grid.

* **Grad-CAM** (Selvaraju et al., 2017, eqs. 1-2). For a layer with output A [B, h, w, K] and the
  pre-softmax score y^c of class c: alpha_k^c = (1 / hw) sum_ij dy^c / dA_ij^k (eq. 1) and
  L^c = ReLU(sum_k alpha_k^c A^k) (eq. 2), bilinearly upsampled to the input size.
* **CAM** (Zhou et al., 2016, sec. 2). For a network ending in global average pooling + linear head
  with kernel w [K, C]: M_c = sum_k w_k^c A^k at the pooled feature map (no ReLU, as in the paper).
  There dy^c/dA_ij^k = w_k^c / (hw), so Grad-CAM = ReLU(CAM) / (hw) (Selvaraju et al., sec. 3.1).

How A and dy/dA are reached without touching model code: `nn.intercept_methods` wraps the chosen
module's `__call__` so that it returns `A + delta`, with `delta` a zero array of A's shape that we
differentiate with respect to. Adding zero changes no value, and d y / d delta at delta = 0 is
exactly d y / d A, in one forward and one backward pass through the unchanged model. (Capturing A
alone, e.g. with `capture_intermediates`, gives no handle to differentiate by.) Scores are summed
over the batch before differentiating: in inference mode (BatchNorm on running statistics, no
dropout) examples do not interact, so each example's slice of the gradient is its own.

Conventions:
* A layer is a module path as in the params tree without `params/`, e.g. `backbone/stage3` or
  `backbone/stage2_block1` (a leading `params/` is accepted). Any module called once whose output
  is a feature map [B, h, w, K] or a token sequence [B, T, D] qualifies.
* Token maps (ViT): the patch tokens are put back on their (H/p, W/p) grid in row-major order, as
  the patch embedding flattened them. A sequence of T = 1 + N tokens whose N forms that grid has a
  class token first, which is dropped; T = N means no class token. p is inferred from T and the
  image size; alpha is the mean over the patch tokens only.
* Default layer (`default_layer`): the last feature map before pooling - the last stage of
  `cnn_small`, the last block of a ResNet, the final LayerNorm of a ViT with `pool='gap'`. With
  `pool='cls'` it is `block{depth-1}/norm1`: after the last block's attention the patch tokens no
  longer reach the class token, so later layers would have zero gradient on every patch.
* `explain` maps are normalised per image to [0, 1] by (m - min) / (max - min); a constant map
  (e.g. Grad-CAM with no positive evidence) becomes all zeros.
* `variables` may be `{'params', 'model_state'}` (as `jtl.checkpoint.load_variables` returns) or
  flax's `{'params', 'batch_stats', ...}`.
"""
from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from etils import epath

from jtl.errors import ConfigError
from jtl.models.classifier import Classifier
from jtl.models.resnet import ResNet
from jtl.models.small import SmallCNN
from jtl.models.vit import ViT

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("gradcam", "cam")
PyTree = Any
# Static description of a layer's output: None for a [B, h, w, K] map, else
# (has_class_token, gh, gw) for tokens.
TokenLayout = tuple[bool, int, int] | None


def _flax_variables(variables: PyTree) -> dict[str, Any]:
  if "model_state" in variables:
    return {"params": variables["params"], **variables["model_state"]}
  return dict(variables)


def _intercept_layer(layer: str, delta: jax.Array | None, captured: dict[str, jax.Array]):
  """An interceptor that returns `A + delta` from `layer`'s `__call__` and keeps A in `captured`."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or "/".join(context.module.path) != layer:
      return out
    if "A" in captured:
      raise ConfigError(f"layer {layer!r} is called more than once per forward pass, so it has no "
                        "single feature map; pick one of its submodules (--layer)")
    captured["A"] = out
    return out if delta is None else out + delta
  return interceptor


def module_outputs(model: nn.Module, variables: PyTree, images: jax.Array) -> dict[str, tuple]:
  """Output shape of every module `__call__` in an inference forward pass, by module path.

  Traced abstractly (`jax.eval_shape`): nothing is compiled or computed. Outputs that are not arrays
  have shape `()`; the model itself is under `''`.
  """
  shapes: dict[str, tuple] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      shapes["/".join(context.module.path)] = tuple(getattr(out, "shape", ()))
    return out

  def forward(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  jax.eval_shape(forward, _flax_variables(variables), images)
  return shapes


def default_layer(model: nn.Module) -> str:
  """The last feature map before pooling of a registered model (see the module docstring)."""
  backbone = getattr(model, "backbone", None)
  if isinstance(backbone, SmallCNN):
    return f"backbone/stage{len(backbone.widths)}"
  if isinstance(backbone, ResNet):
    return f"backbone/stage{len(backbone.stage_sizes)}_block{backbone.stage_sizes[-1] - 1}"
  if isinstance(backbone, ViT):
    if backbone.pool == "gap":
      return "backbone/norm"
    return f"backbone/block{backbone.depth - 1}/norm1"
  raise ConfigError(f"no default layer for a {type(backbone or model).__name__} (it may have no "
                    "spatial feature map); name a layer that outputs [B, h, w, K] or tokens "
                    "(--layer)")


def _is_gap_linear(model: nn.Module) -> bool:
  backbone = getattr(model, "backbone", None)
  gap_vit = isinstance(backbone, ViT) and backbone.pool == "gap"
  return isinstance(model, Classifier) and (isinstance(backbone, (SmallCNN, ResNet)) or gap_vit)


def token_layout(num_tokens: int, height: int, width: int) -> tuple[bool, int, int]:
  """(has_class_token, gh, gw) such that the patch tokens tile a `height x width` image on a
  gh x gw grid of square patches; ConfigError if no layout or more than one fits."""
  fits = []
  for has_cls, n in ((True, num_tokens - 1), (False, num_tokens)):
    for p in range(1, min(height, width) + 1):
      if height % p == 0 and width % p == 0 and (height // p) * (width // p) == n:
        fits.append((has_cls, height // p, width // p))
  if len(fits) != 1:
    why = "ambiguous" if fits else "no square patch size fits"
    raise ConfigError(f"cannot place {num_tokens} tokens on a patch grid of a {height}x{width} "
                      f"image ({why}); pick a layer whose output is [B, h, w, K] or [B, (1+)N, D] "
                      "patch tokens (--layer)")
  return fits[0]


def resolve_layer(model: nn.Module, variables: PyTree, images: jax.Array, *,
                  method: str = "gradcam", layer: str | None = None
                  ) -> tuple[str, TokenLayout, int]:
  """Checks the inputs without compiling anything; returns (layer path, token layout, num_classes).

  Raises ConfigError for an unknown method or layer (listing the nearest module paths), a layer
  output that is no feature map, or CAM on a model or layer it is not defined for.
  """
  if method not in METHODS:
    raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)} (--method)")
  if np.ndim(images) != 4:
    raise ConfigError(f"images must be [B, H, W, C], got shape {np.shape(images)}")
  if isinstance(model, Classifier) and not model.num_classes:
    raise ConfigError("the model has no head (num_classes=0), so there are no class scores to "
                      "explain")
  if layer is None:
    layer = default_layer(model)
  layer = layer.removeprefix("params/")
  outputs = module_outputs(model, variables, images)
  if len(outputs.get("", ())) != 2:
    raise ConfigError(f"the model's output has shape {outputs.get('')}, not [B, num_classes] "
                      "logits")
  if layer not in outputs or not layer:
    paths = [p for p in outputs if p]
    near = difflib.get_close_matches(layer, paths, n=5, cutoff=0.0)
    raise ConfigError(f"unknown layer {layer!r}; nearest module paths: {', '.join(near)} (--layer)")
  shape = outputs[layer]
  if len(shape) == 4:
    layout = None
  elif len(shape) == 3:
    layout = token_layout(shape[1], images.shape[1], images.shape[2])
  else:
    raise ConfigError(f"layer {layer!r} outputs shape {shape}, not a feature map [B, h, w, K] or "
                      f"tokens [B, T, D]; try {default_layer(model)!r} (--layer)")
  if method == "cam":
    if not _is_gap_linear(model):
      raise ConfigError("CAM needs global average pooling + a linear head (cnn_small, resnets, "
                        "vit with pool='gap'); use --method=gradcam")
    if layer != default_layer(model):
      raise ConfigError(f"CAM is defined at the pooled feature map {default_layer(model)!r}, not "
                        f"{layer!r}; drop --layer or use --method=gradcam")
  return layer, layout, outputs[""][-1]


def _as_grid(a: jax.Array, layout: TokenLayout) -> jax.Array:
  """[B, h, w, K] as is; tokens [B, (1+)N, D] -> patch tokens on their grid [B, gh, gw, D]."""
  if layout is None:
    return a
  has_cls, gh, gw = layout
  patches = a[:, 1:] if has_cls else a
  return patches.reshape(a.shape[0], gh, gw, a.shape[-1])


@functools.partial(jax.jit, static_argnames=("model", "layer", "layout", "method"))
def _raw_maps(variables: PyTree, images: jax.Array, classes: jax.Array, *, model: nn.Module,
              layer: str, layout: TokenLayout, method: str) -> tuple[jax.Array, jax.Array]:
  """Maps at the layer's resolution [B, h, w] (float32) and logits; class -1 = the predicted one."""
  def pick(logits):
    predicted = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    return jnp.where(classes < 0, predicted, classes)

  if method == "cam":
    captured = {}
    with nn.intercept_methods(_intercept_layer(layer, None, captured)):
      logits = model.apply(variables, images, train=False)
    features = _as_grid(captured["A"], layout).astype(jnp.float32)
    weights = jnp.asarray(variables["params"]["head"]["kernel"], jnp.float32)[:, pick(logits)]
    return jnp.einsum("bhwk,kb->bhw", features, weights), logits

  def class_score(delta):
    captured = {}
    with nn.intercept_methods(_intercept_layer(layer, delta, captured)):
      logits = model.apply(variables, images, train=False)
    score = jnp.take_along_axis(logits, pick(logits)[:, None], axis=1).sum()
    return score, (logits, captured["A"])

  abstract = jax.eval_shape(lambda: class_score(None)[1][1])
  delta = jnp.zeros(abstract.shape, abstract.dtype)
  grads, (logits, activations) = jax.grad(class_score, has_aux=True)(delta)
  activations = _as_grid(activations, layout).astype(jnp.float32)
  alpha = jnp.mean(_as_grid(grads, layout).astype(jnp.float32), axis=(1, 2))  # eq. 1: [B, K]
  return jax.nn.relu(jnp.einsum("bhwk,bk->bhw", activations, alpha)), logits  # eq. 2


def _class_array(classes: Any, batch: int, num_classes: int) -> jax.Array:
  if classes is None:
    return jnp.full((batch,), -1, jnp.int32)
  values = np.asarray(classes)
  if values.ndim == 0:
    values = np.broadcast_to(values, (batch,))
  if values.shape != (batch,) or not np.issubdtype(values.dtype, np.integer) or (
      values.size and not (values.min() >= 0 and values.max() < num_classes)):
    raise ConfigError(f"classes must be None, an int or [B={batch}] ints in [0, {num_classes}); "
                      f"got {classes!r}")
  return jnp.asarray(values, jnp.int32)


def feature_maps(model: nn.Module, variables: PyTree, images: Any, *, method: str = "gradcam",
                 layer: str | None = None, classes: Any = None) -> tuple[jax.Array, jax.Array]:
  """Un-normalised maps at the layer's resolution `[B, h, w]` and the logits `[B, C]`.

  Grad-CAM maps are ReLU(sum_k alpha_k A^k); CAM maps are sum_k w_k A^k (signed). `classes`: None
  for each example's predicted class, an int for all, or `[B]` ints.
  """
  images = jnp.asarray(images, jnp.float32)
  variables = _flax_variables(variables)
  layer, layout, num_classes = resolve_layer(model, variables, images, method=method, layer=layer)
  class_ids = _class_array(classes, images.shape[0], num_classes)
  return _raw_maps(variables, images, class_ids, model=model, layer=layer, layout=layout,
                   method=method)


@jax.jit
def upsample_and_normalise(maps: jax.Array, images: jax.Array) -> jax.Array:
  """Bilinear (half-pixel centres) resize of `[B, h, w]` to the images' H x W, then per-image
  (m - min) / (max - min) into [0, 1] (all zeros where the map is constant)."""
  height, width = images.shape[1:3]
  up = jax.image.resize(maps, (maps.shape[0], height, width), method="bilinear")
  low = up.min(axis=(1, 2), keepdims=True)
  span = up.max(axis=(1, 2), keepdims=True) - low
  return jnp.where(span > 0, (up - low) / jnp.where(span > 0, span, 1.0), 0.0)


def explain(model: nn.Module, variables: PyTree, images: Any, *, method: str = "gradcam",
            layer: str | None = None, classes: Any = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Grad-CAM or CAM maps for a batch, in inference mode.

  Args:
    model: a linen model mapping `[B, H, W, C]` images to logits `[B, C]` (any jtl `Classifier`).
    variables: `{'params', 'model_state'}` or flax-style `{'params', 'batch_stats'}`.
    images: `[B, H, W, C]`, preprocessed as for the model.
    method: "gradcam" (any layer) or "cam" (GAP + linear models, at the pooled feature map).
    layer: module path such as `backbone/stage3`; None for `default_layer(model)`.
    classes: None to explain each example's predicted class, an int, or `[B]` ints.

  Returns:
    (maps `[B, H, W]` in [0, 1] per image, predicted classes `[B]`, logits `[B, C]`).
  """
  images = jnp.asarray(images, jnp.float32)
  maps, logits = feature_maps(model, variables, images, method=method, layer=layer, classes=classes)
  return upsample_and_normalise(maps, images), jnp.argmax(logits, axis=-1), logits


def save_grid(images: Any, maps: Any, predicted: Any, labels: Any | None, path: str | epath.Path,
              class_names: Sequence[str] | None = None, *, title: str | None = None,
              per_row: int = 8) -> epath.Path:
  """PNG grid: per example, the input above its heatmap overlay, titled "pred P / true T" (red when
  wrong). Images are min-max rescaled for display only. Returns the written path."""
  images, maps = np.asarray(images, np.float32), np.asarray(maps, np.float32)
  predicted = np.asarray(predicted)
  labels = None if labels is None else np.asarray(labels)
  def name(c: Any) -> str:
    return str(int(c)) if class_names is None else str(class_names[int(c)])

  count = len(images)
  columns = max(1, min(per_row, count))
  blocks = -(-count // columns)
  fig, axes = plt.subplots(2 * blocks, columns, figsize=(1.4 * columns, 2.9 * blocks), dpi=120,
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for i in range(count):
    top, bottom = axes[2 * (i // columns), i % columns], axes[2 * (i // columns) + 1, i % columns]
    image = images[i]
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
    if image.shape[-1] == 3:
      shown = image
    else:  # grey (C = 1), or the channel mean of anything else
      shown = image.mean(-1)
    cmap = "gray" if shown.ndim == 2 else None
    top.imshow(shown, cmap=cmap, interpolation="nearest")
    bottom.imshow(shown, cmap=cmap, interpolation="nearest")
    bottom.imshow(maps[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")
    text = f"pred {name(predicted[i])}"
    wrong = False
    if labels is not None:
      text += f" / true {name(labels[i])}"
      wrong = int(predicted[i]) != int(labels[i])
    top.set_title(text, fontsize=7, color="red" if wrong else "black")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path
