"""On-device image augmentation in JAX: the random views of contrastive objectives (SimCLR, SupCon).

The pipeline follows SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", Appendix A), after two optional geometric distortions for handwriting-like data
(off by default): a small random rotation and an elastic distortion (Simard et al. 2003), applied as
one bilinear resampling; then random resized crop → horizontal flip → colour jitter (brightness,
contrast, saturation, hue, in a random order, with probability p) → random grayscale → Gaussian blur;
plus optional additive Gaussian noise. The jitter amounts are (0.8s, 0.8s, 0.8s, 0.2s) for SimCLR's
strength s (`strength`); a factor f ~ U[max(0, 1 - a), 1 + a] is drawn for an amount a, a hue shift
d ~ U[-a, a] (in turns of the hue circle).

Conventions (the ops themselves are `jtl/image_ops.py`):
* Images are float [B, H, W, C] (C = 1 or 3), values in `clip_range` (default [0, 1]). Saturation, hue
  and grayscale act only on C = 3; every other op acts on any C. Each jitter op, and the noise, is
  clipped to `clip_range` as in SimCLR; crop, flip, grayscale and blur are convex combinations of pixels
  and stay in range by themselves. For normalised images set `clip_range=None`: crop, flip, brightness
  (then a scaling about the normalisation mean), contrast, blur and noise need no particular range,
  but saturation, hue and grayscale assume RGB in [0, 1], so apply them before per-channel normalising.
* Randomness is a function of (key, global example index) only: example i draws one vector of uniforms
  from `fold_in(key, index_offset + i)`, each op at fixed offsets in it, so the result does not depend
  on how the batch is sharded, and switching one op off leaves the others' draws unchanged. Call
  `augment` on the global array under `jit`, not on a shard inside `shard_map` (or pass `index_offset`).
* Every op is also a public function on one image [H, W, C] with explicit parameters, for tests.
* Formulas: brightness x·f (SimCLR v2's multiplicative form); contrast (x - μ_c)·f + μ_c with μ_c the
  per-channel mean (as tf.image.adjust_contrast); saturation g + f·(x - g) with g the BT.601 luma (as
  torchvision); hue: rotation in HSV; blur: separable Gaussian with half-sample symmetric padding, which
  keeps a constant image constant and the image mean exactly; rotation and elastic distortion: output
  pixel p reads the input at R(-theta) (p - c) + c + d(p) (c the image centre, d the elastic field),
  bilinearly, outside positions clamped to the border pixels (scipy.ndimage's order=1, mode='nearest').
  The elastic field is Simard et al.'s: uniform [-1, 1] per pixel and axis, Gaussian-smoothed with
  std `elastic_sigma` (half-sample symmetric padding, radius 3 sigma), times `elastic_alpha` pixels.
  Its H*W*2 uniforms come from a second stream, `fold_in(example key, 1)`, drawn only when the op is
  on, so the other ops' draws are the same with it on or off.
"""
from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jtl.errors import ConfigError
from jtl.image_ops import (CROP_DRAWS, add_noise, blur_radius, color_jitter, crop_box,
                           elastic_field, flip, gaussian_blur, resized_crop, to_grayscale,
                           uniform_to_normal, warp)

# The whole image as a crop box (top, left, height, width), in fractions of the image.
FULL_BOX = (0.0, 0.0, 1.0, 1.0)
# Each example draws one vector of uniforms for all ops (one PRNG call: on XLA:CPU each threefry call
# costs ~0.3 s of compile time), at fixed offsets, so switching one op off leaves the others' draws as
# they were. Per op: [apply?, parameters...].
_DRAW_SIZES = dict(crop=1 + CROP_DRAWS, flip=1, jitter=1 + 3 + 1 + 4, grayscale=1, blur=2, noise=1)
_DRAW_OFFSETS = [0, *itertools.accumulate(_DRAW_SIZES.values())]
_DRAW_SLICES = {op: slice(start, end)
                for op, start, end in zip(_DRAW_SIZES, _DRAW_OFFSETS, _DRAW_OFFSETS[1:])}
_NUM_DRAWS = _DRAW_OFFSETS[-1]

_PROBABILITIES = ("crop_prob", "flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "noise_prob",
                  "rotate_prob", "elastic_prob")
_NON_NEGATIVE = ("brightness", "contrast", "saturation", "hue", "strength", "noise_std",
                 "rotate_degrees", "elastic_alpha")


def default_config() -> ml_collections.ConfigDict:
  """Every option, with defaults for SimCLR on the 8x8 grayscale digits.

  Differences from SimCLR's ImageNet recipe, and why: crop area >= 40% (an 8% crop of an 8x8 digit is
  ~2x2 pixels of stroke); no flip (digits are not mirror-symmetric); strength 0.5 (SimCLR's CIFAR-10
  value); no blur (SimCLR drops it on CIFAR-10, and at 8x8 a sigma of ~1 pixel already erases strokes).
  On C = 1 saturation, hue and grayscale are no-ops, so digits get crop + brightness/contrast.
  """
  return ml_collections.ConfigDict(dict(
      crop_prob=1.0,  # probability of a random resized crop (resampled bilinearly to the input size)
      crop_scale=(0.4, 1.0),  # range of the crop's area, as a fraction of the image's area
      crop_ratio=(3 / 4, 4 / 3),  # range of the crop's aspect ratio width/height (drawn log-uniformly)
      flip_prob=0.0,  # probability of a horizontal flip (0: digits are not mirror-symmetric)
      jitter_prob=0.8,  # probability of colour jitter (its four ops in a random order)
      brightness=0.8,  # brightness amount a: x * f, f ~ U[max(0, 1 - a*s), 1 + a*s]
      contrast=0.8,  # contrast amount: (x - channel mean) * f + channel mean
      saturation=0.8,  # saturation amount: blend with the grayscale image (C = 3 only)
      hue=0.2,  # hue amount: shift ~ U[-a*s, a*s] turns of the hue circle, a*s <= 0.5 (C = 3 only)
      strength=0.5,  # SimCLR's colour strength s, multiplies the four jitter amounts
      grayscale_prob=0.2,  # probability of converting to grayscale (C = 3 only)
      blur_prob=0.0,  # probability of a Gaussian blur
      blur_sigma=(0.1, 1.0),  # blur sigma range in pixels; kernel radius min(ceil(3*max), side - 1)
      noise_prob=0.0,  # probability of additive Gaussian noise
      noise_std=0.05,  # standard deviation of that noise
      clip_range=(0.0, 1.0),  # pixel range to clip to after each jitter op and the noise; None = off
      # Geometric distortions, before the crop (off by default; glyphs: represent_glyphs.py).
      rotate_prob=0.0,  # probability of a rotation about the centre
      rotate_degrees=15.0,  # the angle ~ U[-a, a] degrees
      elastic_prob=0.0,  # probability of an elastic distortion (Simard et al. 2003)
      # Displacement scale in pixels, of the smoothed [-1, 1] field: at sigma 3, alpha 20 moves a pixel
      # by about 1 pixel (std), what the glyphs' own elastic distortion does at 28x28.
      elastic_alpha=20.0,
      elastic_sigma=3.0,  # std of the field's Gaussian smoothing, in pixels
  ))


def _fail(key: str, value: Any, requirement: str) -> NoReturn:
  raise ConfigError(f"augment.{key}={value!r} {requirement}; fix --config.augment.{key}")


def _is_number(value: Any) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    return False
  return math.isfinite(value)


def _check_pair(options: Mapping[str, Any], key: str, low: float, low_inclusive: bool,
                high: float = math.inf) -> None:
  pair = options[key]
  if not (isinstance(pair, Sequence) and len(pair) == 2 and all(_is_number(v) for v in pair)):
    _fail(key, pair, "must be a pair (min, max) of finite numbers")
  lo, hi = pair
  if lo > hi:
    _fail(key, pair, "has min > max")
  if (lo < low if low_inclusive else lo <= low) or hi > high:
    bound = "[" if low_inclusive else "("
    _fail(key, pair, f"must lie in {bound}{low}, {high}]")


def _options(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """Validated options: the defaults updated with `cfg` (which may name only some keys)."""
  known = default_config()
  options = {key: known[key] for key in known.keys()}
  for key in cfg.keys():
    if key not in options:
      close = difflib.get_close_matches(key, list(options), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown option --config.augment.{key}{hint}; valid options: "
                        f"{', '.join(sorted(options))}")
    options[key] = cfg[key]
  for key in _PROBABILITIES:
    if not _is_number(options[key]) or not 0 <= options[key] <= 1:
      _fail(key, options[key], "must be a probability in [0, 1]")
  for key in _NON_NEGATIVE:
    if not _is_number(options[key]) or options[key] < 0:
      _fail(key, options[key], "must be a finite number >= 0")
  if options["hue"] * options["strength"] > 0.5:  # a larger shift wraps round the hue circle
    _fail("hue", options["hue"], f"times strength={options['strength']} must lie in [0, 0.5]")
  _check_pair(options, "crop_scale", 0.0, low_inclusive=False, high=1.0)
  _check_pair(options, "crop_ratio", 0.0, low_inclusive=False)
  _check_pair(options, "blur_sigma", 0.0, low_inclusive=False)
  if not _is_number(options["elastic_sigma"]) or options["elastic_sigma"] <= 0:
    _fail("elastic_sigma", options["elastic_sigma"], "must be a finite number > 0")
  if options["clip_range"] is not None:
    _check_pair(options, "clip_range", -math.inf, low_inclusive=False)
    if options["clip_range"][0] == options["clip_range"][1]:
      _fail("clip_range", options["clip_range"], "must have min < max (or be None for no clipping)")
  return options


def validate(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming `--config.augment.KEY` for an unknown key or a value out of range."""
  _options(cfg)


# ---------------------------------------------------------------- ops on one image [H, W, C]


def _augment_example(image: jax.Array, key: jax.Array, options: dict[str, Any]) -> jax.Array:
  """One random view of one image; ops whose probability is 0 are left out of the graph."""
  height, width, channels = image.shape
  clip_range = options["clip_range"]
  add_noise_here = options["noise_prob"] > 0 and options["noise_std"] > 0
  # The noise's uniforms follow the ops' draws in the same call (see _DRAW_SIZES for why one call).
  uniforms = jax.random.uniform(key, (_NUM_DRAWS + (image.size if add_noise_here else 0),))

  def draws(op: str) -> jax.Array:
    return uniforms[_DRAW_SLICES[op]]

  rotate = options["rotate_prob"] > 0 and options["rotate_degrees"] > 0
  elastic = options["elastic_prob"] > 0 and options["elastic_alpha"] > 0
  if rotate or elastic:
    # A second stream, so that the draws of the ops above are the same with these on or off.
    geo = jax.random.uniform(jax.random.fold_in(key, 1), (4 + (height * width * 2 if elastic else 0),))
    angle = 0.0
    if rotate:
      degrees = options["rotate_degrees"] * (2.0 * geo[1] - 1.0)
      angle = jnp.where(geo[0] < options["rotate_prob"], jnp.deg2rad(degrees), 0.0)
    field = None
    if elastic:
      field = elastic_field(geo[4:].reshape(height, width, 2), options["elastic_alpha"],
                            options["elastic_sigma"])
      field = jnp.where(geo[2] < options["elastic_prob"], field, 0.0)
    image = warp(image, angle, field)
  if options["crop_prob"] > 0:
    crop_draws = draws("crop")
    box = crop_box(crop_draws[1:], options["crop_scale"], options["crop_ratio"], aspect=width / height)
    image = resized_crop(image, jnp.where(crop_draws[0] < options["crop_prob"], box,
                                          jnp.asarray(FULL_BOX)))
  if options["flip_prob"] > 0:
    image = flip(image, draws("flip")[0] < options["flip_prob"])
  amounts = [options[k] * options["strength"] for k in ("brightness", "contrast", "saturation", "hue")]
  if options["jitter_prob"] > 0 and any(amounts):
    jitter_draws = draws("jitter")
    low = jnp.asarray([max(0.0, 1.0 - a) for a in amounts[:3]] + [-amounts[3]])
    high = jnp.asarray([1.0 + a for a in amounts])
    factors = low + (high - low) * jitter_draws[1:5]
    order = jnp.argsort(jitter_draws[5:9])  # a uniformly random permutation of the four ops
    jittered = color_jitter(image, factors, order, clip_range)
    image = jnp.where(jitter_draws[0] < options["jitter_prob"], jittered, image)
  if options["grayscale_prob"] > 0 and channels == 3:
    image = jnp.where(draws("grayscale")[0] < options["grayscale_prob"], to_grayscale(image), image)
  if options["blur_prob"] > 0:
    blur_draws = draws("blur")
    sigma_min, sigma_max = options["blur_sigma"]
    sigma = sigma_min + (sigma_max - sigma_min) * blur_draws[1]
    radius = (blur_radius(sigma_max, height), blur_radius(sigma_max, width))
    image = jnp.where(blur_draws[0] < options["blur_prob"], gaussian_blur(image, sigma, radius), image)
  if add_noise_here:
    normal = uniform_to_normal(uniforms[_NUM_DRAWS:].reshape(image.shape))
    noisy = add_noise(image, normal, options["noise_std"])
    if clip_range is not None:
      noisy = jnp.clip(noisy, clip_range[0], clip_range[1])
    image = jnp.where(draws("noise")[0] < options["noise_prob"], noisy, image)
  return image


def augment(images: jax.Array, key: jax.Array, cfg: Mapping[str, Any] | ml_collections.ConfigDict,
            *, index_offset: int | jax.Array = 0) -> jax.Array:
  """One random view of a batch [B, H, W, C]; example i draws from `fold_in(key, index_offset + i)`.

  `cfg` may name only some options (the rest take their defaults); it is validated here, at trace time.
  """
  options = _options(cfg)
  if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"augment expects float images [B, H, W, C], got {images.dtype} {images.shape}")
  indices = index_offset + jnp.arange(images.shape[0])
  example_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)
  augmented = jax.vmap(lambda image, k: _augment_example(image, k, options))(
      images.astype(jnp.float32), example_keys)
  return augmented.astype(images.dtype)


def views(images: jax.Array, key: jax.Array, cfg: Mapping[str, Any] | ml_collections.ConfigDict,
          num_views: int = 2) -> jax.Array:
  """`num_views` independent views [B, V, H, W, C]; view v is `augment(images, fold_in(key, v), cfg)`."""
  if num_views < 1:
    raise ConfigError(f"num_views={num_views} must be >= 1; ask for at least one view")
  view_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_views))
  stacked = jax.vmap(lambda k: augment(images, k, cfg))(view_keys)  # [V, B, H, W, C]
  return jnp.swapaxes(stacked, 0, 1)
