"""The single-image operations of `jtl/augment.py`'s pipeline, as pure JAX functions of an image
[H, W, C] in [0, 1] and the draws that parameterise them: crops, flip, colour jitter, blur, rotation
and elastic distortion, noise. Their formulas and conventions are in `jtl/augment.py`'s docstring;
the pipeline there (options, per-example draws, the order of the ops) calls them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfinv

# ITU-R BT.601 luma weights, as tf.image.rgb_to_grayscale and torchvision use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Crop candidates drawn per example; the first that fits inside the image is used (torchvision: 10).
CROP_ATTEMPTS = 10
# Uniform draws per crop: candidate areas and ratios, then the position.
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2


def crop_box(uniforms: jax.Array, scale: Sequence[float], ratio: Sequence[float],
             aspect: float = 1.0) -> jax.Array:
  """The (top, left, height, width) box, in fractions of an image whose width/height is `aspect`.

  `uniforms` are CROP_DRAWS values in [0, 1): CROP_ATTEMPTS candidate areas (fraction of the image,
  mapped onto `scale`), CROP_ATTEMPTS candidate aspect ratios (log-uniform over `ratio`), then the
  vertical and horizontal position. The first candidate that fits is taken; if none does (extreme
  ratios only), its sides are clamped to the image.
  """
  area = scale[0] + (scale[1] - scale[0]) * uniforms[:CROP_ATTEMPTS]
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  crop_ratio = jnp.exp(log_low + (log_high - log_low) * uniforms[CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
  width = jnp.sqrt(area * crop_ratio / aspect)
  height = jnp.sqrt(area * aspect / crop_ratio)
  first_fit = jnp.argmax((width <= 1.0) & (height <= 1.0))  # 0 when none fits
  height, width = jnp.minimum(height[first_fit], 1.0), jnp.minimum(width[first_fit], 1.0)
  top, left = uniforms[2 * CROP_ATTEMPTS:] * jnp.stack([1.0 - height, 1.0 - width])
  return jnp.stack([top, left, height, width])


def _bilinear_matrix(start: jax.Array, length: jax.Array, size: int) -> jax.Array:
  """[size, size] weights that resample the span [start, start + length) (fractions) onto `size` pixels.

  Output pixel o (centre o + 0.5) reads input position size * start + (o + 0.5) * length, i.e. index
  minus 0.5; positions are clamped to the outer pixel centres, as jax.image.scale_and_translate does.
  """
  source = size * start + (jnp.arange(size, dtype=jnp.float32) + 0.5) * length - 0.5
  source = jnp.clip(source, 0.0, size - 1.0)
  return jnp.maximum(0.0, 1.0 - jnp.abs(source[:, None] - jnp.arange(size, dtype=jnp.float32)))


def resized_crop(image: jax.Array, box: jax.Array) -> jax.Array:
  """Crops `box` (top, left, height, width; fractions) and resamples it bilinearly to the input size.

  The crop is never larger than the image, so this only upsamples and needs no antialiasing. Written as
  two small interpolation matrices rather than jax.image.scale_and_translate (same values to float32
  rounding): a third less compile time on XLA:CPU.
  """
  height, width = image.shape[:2]
  box = jnp.asarray(box, jnp.float32)
  rows = _bilinear_matrix(box[0], box[2], height)
  cols = _bilinear_matrix(box[1], box[3], width)
  # HIGHEST: accelerators would otherwise multiply in bf16/tf32.
  return jnp.einsum("ih,hwc,jw->ijc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)


def random_resized_crop(image: jax.Array, key: jax.Array, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
  """`resized_crop` at a random box (see `crop_box`)."""
  uniforms = jax.random.uniform(key, (CROP_DRAWS,))
  return resized_crop(image, crop_box(uniforms, scale, ratio, aspect=image.shape[1] / image.shape[0]))


def flip(image: jax.Array, do_flip: jax.Array | bool) -> jax.Array:
  """Mirrors the image left-right where `do_flip` is true."""
  return jnp.where(do_flip, image[:, ::-1], image)


def adjust_brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """x * factor."""
  return image * factor


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """(x - mean) * factor + mean, with the mean per channel over the image."""
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  return (image - mean) * factor + mean


def to_grayscale(image: jax.Array) -> jax.Array:
  """BT.601 luma, repeated over the 3 channels (C = 3); other C are returned unchanged."""
  if image.shape[-1] != 3:
    return image
  luma = image @ jnp.asarray(LUMA_WEIGHTS, image.dtype)
  return jnp.repeat(luma[..., None], 3, axis=-1)


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """gray + factor * (x - gray): 0 gives grayscale, 1 the image (C = 3; other C unchanged)."""
  if image.shape[-1] != 3:
    return image
  gray = to_grayscale(image)
  return gray + factor * (image - gray)


def adjust_hue(image: jax.Array, delta: jax.Array | float) -> jax.Array:
  """Rotates the HSV hue by `delta` turns (C = 3; other C unchanged). Saturation and value are kept."""
  if image.shape[-1] != 3:
    return image
  red, green, blue = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.max(image, axis=-1)
  chroma = value - jnp.min(image, axis=-1)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)  # gray pixels: hue is arbitrary, avoid 0/0
  hue_sixths = jnp.where(value == red, jnp.mod((green - blue) / safe_chroma, 6.0),
                         jnp.where(value == green, (blue - red) / safe_chroma + 2.0,
                                   (red - green) / safe_chroma + 4.0))
  hue_sixths = jnp.mod(hue_sixths + 6.0 * delta, 6.0)
  # HSV -> RGB: channel n in (5, 3, 1) is V - C * clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
  channels = []
  for n in (5.0, 3.0, 1.0):
    k = jnp.mod(n + hue_sixths, 6.0)
    channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(channels, axis=-1)


def color_jitter(image: jax.Array, factors: jax.Array, order: jax.Array,
                 clip_range: Sequence[float] | None = None) -> jax.Array:
  """Brightness, contrast, saturation factors and hue shift (`factors`, [4]) applied in `order`.

  `order` is a permutation of 0..3 (0 brightness, 1 contrast, 2 saturation, 3 hue). Each op's output is
  clipped to `clip_range` when given, as in SimCLR, so the order matters.
  """
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

  def branch(op_index: int):
    def apply(x):
      x = ops[op_index](x, factors[op_index])
      return x if clip_range is None else jnp.clip(x, clip_range[0], clip_range[1])
    return apply

  branches = [branch(i) for i in range(len(ops))]
  for slot in range(len(ops)):
    image = jax.lax.switch(order[slot], branches, image)
  return image


def blur_radius(sigma_max: float, size: int) -> int:
  """Static kernel radius for sigmas up to `sigma_max` on a side of `size`: 3 sigma, inside the image."""
  return max(0, min(math.ceil(3.0 * sigma_max), size - 1))


def _blur_matrix(sigma: jax.Array, size: int, radius: int) -> jax.Array:
  """[size, size] matrix of a 1-D Gaussian blur with half-sample symmetric padding (rows sum to 1).

  Its columns also sum to 1 (the padding mirrors each tap of a symmetric kernel onto the pixel it left),
  which is what keeps the image mean exact.
  """
  offsets = np.arange(-radius, radius + 1)
  source = np.arange(size)[:, None] + offsets[None, :]  # [size, taps], before folding at the borders
  source = np.where(source < 0, -source - 1, source)
  source = np.where(source >= size, 2 * size - 1 - source, source)
  taps = np.zeros((len(offsets), size, size), np.float32)
  np.add.at(taps, (np.arange(len(offsets))[None, :], np.arange(size)[:, None], source), 1.0)
  weights = jnp.exp(-0.5 * (jnp.asarray(offsets, jnp.float32) / sigma) ** 2)
  return jnp.tensordot(weights / jnp.sum(weights), jnp.asarray(taps), axes=1)


def gaussian_blur(image: jax.Array, sigma: jax.Array | float,
                  radius: int | tuple[int, int]) -> jax.Array:
  """Separable Gaussian blur with std `sigma` pixels; `radius` (static) per axis, clipped to side - 1."""
  height, width = image.shape[:2]
  radius_h, radius_w = (radius, radius) if isinstance(radius, int) else radius
  rows = _blur_matrix(sigma, height, min(radius_h, height - 1))
  cols = _blur_matrix(sigma, width, min(radius_w, width - 1))
  # HIGHEST: accelerators would otherwise multiply in bf16/tf32.
  return jnp.einsum("ih,hwc,jw->ijc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)


def warp(image: jax.Array, angle: jax.Array | float, displacement: jax.Array | None = None
         ) -> jax.Array:
  """The image rotated by `angle` radians about its centre and displaced by `displacement` [H, W, 2]
  (rows, columns; pixels): output pixel p reads the input at R(-angle) (p - c) + c + d(p),
  bilinearly, with positions outside the image clamped to its border pixels.

  A positive angle turns the content counter-clockwise as displayed (row 0 at the top), as
  scipy.ndimage.rotate does.
  """
  height, width = image.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  dr, dc = rows - centre_r, cols - centre_c
  source_r = cos * dr + sin * dc + centre_r
  source_c = -sin * dr + cos * dc + centre_c
  if displacement is not None:
    source_r, source_c = source_r + displacement[..., 0], source_c + displacement[..., 1]
  source_r = jnp.clip(source_r, 0.0, height - 1.0)
  source_c = jnp.clip(source_c, 0.0, width - 1.0)
  # Bilinear: the four neighbours' weights (a weight is 0 where the position is on a pixel centre).
  r0, c0 = jnp.floor(source_r), jnp.floor(source_c)
  wr, wc = (source_r - r0)[..., None], (source_c - c0)[..., None]
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  r1, c1 = jnp.minimum(r0 + 1, height - 1), jnp.minimum(c0 + 1, width - 1)
  return ((1 - wr) * ((1 - wc) * image[r0, c0] + wc * image[r0, c1])
          + wr * ((1 - wc) * image[r1, c0] + wc * image[r1, c1]))


def elastic_field(uniforms: jax.Array, alpha: float, sigma: float) -> jax.Array:
  """[H, W, 2] displacement (pixels) from uniforms [H, W, 2] in [0, 1): Simard et al.'s field,
  2u - 1 smoothed by a Gaussian of std `sigma` (half-sample symmetric padding, radius 3 sigma), times
  `alpha`."""
  height, width = uniforms.shape[:2]
  radius = (blur_radius(sigma, height), blur_radius(sigma, width))
  return alpha * gaussian_blur(2.0 * uniforms - 1.0, sigma, radius)


def uniform_to_normal(uniforms: jax.Array) -> jax.Array:
  """Standard normal draws from uniforms in [0, 1) by the inverse CDF, sqrt(2) erfinv(2u - 1)."""
  lowest = np.nextafter(np.float32(-1), np.float32(0))  # u = 0 would map to -inf
  return np.float32(np.sqrt(2.0)) * erfinv(jnp.maximum(2.0 * uniforms - 1.0, lowest))


def add_noise(image: jax.Array, normal: jax.Array, std: float) -> jax.Array:
  """x + std * z for standard normal draws `normal` shaped like the image."""
  return image + std * normal


# ---------------------------------------------------------------- the batch
