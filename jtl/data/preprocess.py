"""Decoding, crop augmentation and normalisation, in TensorFlow on the CPU (NumPy for one-off work).

Augmentation randomness is a function of (seed, global example position) only, drawn with stateless
TF random ops, so a resumed iterator reproduces it exactly whatever the number of hosts.

Two crop conventions (`data.crop`): 'resize' (the image resized to `image_size`, plus the optional
zero-padded random crop of `data.augment`) and 'inception', the ImageNet recipe: in training a
random-resized crop (Szegedy et al. 2015; torchvision's RandomResizedCrop: area fraction and aspect
ratio drawn uniformly, log-uniformly for the ratio, up to 10 tries, else a centre crop of the allowed
aspect), resized to `image_size`; in evaluation the shorter side resized to `image_size /
center_crop` and the centre `image_size` square kept. `data.flip` mirrors half of the training
images left to right, with either convention.
"""
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Purposes folded into the user's seed so shuffling and augmentation draw independent streams.
SHUFFLE, AUGMENT, RESIZED_CROP = 1, 2, 3
# Crop offsets are drawn in blocks of this many global positions: one stateless op per block.
OFFSET_BLOCK = 1 << 16
# Random-resized crop: tries per image (torchvision's), and the uniform draws each position gets:
# (area, log-ratio, top, left) per try, then one for the flip.
CROP_TRIES = 10
CROP_DRAWS = 4 * CROP_TRIES + 1
ASPECT_RATIOS = (3 / 4, 4 / 3)


def derive_key(seed: int, purpose: int) -> int:
  """A 31-bit key for one purpose, derived from the user's seed (same on every host and run)."""
  return int(np.random.SeedSequence([seed & 0xFFFFFFFF, purpose]).generate_state(1)[0] >> 1)


def decoder(image_feature: tfds.features.Image, image_size: int | None,
            targets: tuple[str, ...] = ('label',), *, center_crop: float | None = None
            ) -> Callable[[dict], dict]:
  """Returns example -> example: the image decoded (uint8) and resized to a square if asked (with
  `center_crop`: its shorter side to `image_size / center_crop`, then the centre square); the
  `targets` features carried along, integers as int32 and floats as float32."""

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = image_feature.decode_example(example['image'])
    if image_size is not None and center_crop is not None:
      image = _to_uint8(central_square(image, image_size, center_crop))
    elif image_size is not None:
      # Back to uint8: 4x less memory in the cache, same values whether cached or streamed.
      image = _to_uint8(tf.image.resize(image, [image_size, image_size], antialias=True))
    return {'image': image, **{k: _narrow(example[k]) for k in targets}}

  return decode


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def central_square(image: tf.Tensor, size: int, fraction: float) -> tf.Tensor:
  """[H, W, C] -> float [size, size, C]: the shorter side resized to round(size / fraction)
  (antialiased), then the centre size x size square (the ImageNet evaluation crop; 0.875 = 224/256)."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = tf.round(size / fraction) / tf.minimum(height, width)
  new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
  new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, image.shape[-1]])


def crop_draws(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns block -> float32 [OFFSET_BLOCK, CROP_DRAWS]: uniform [0, 1) draws of the positions in
  that block, from which `resized_crop_boxes` makes each one's crop and flip."""
  key = tf.constant(derive_key(seed, RESIZED_CROP), tf.int64)

  def draw(block: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([OFFSET_BLOCK, CROP_DRAWS], seed=tf.stack([key, block]),
                                       alg='philox')

  return draw


def resized_crop_boxes(draws: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                       area: tuple[float, float]) -> tf.Tensor:
  """[n, CROP_DRAWS] draws of images of `height` x `width` pixels ([n] or scalars) -> [n, 4] crop
  boxes (top, left, bottom, right), pixel indices of the first and last row and column kept.

  Per image, the first of CROP_TRIES candidates that fits: area fraction uniform in `area`, aspect
  ratio w/h log-uniform in ASPECT_RATIOS, the position uniform over the places it fits. None fits:
  the whole image cut to the nearest allowed aspect ratio, centred (torchvision's fallback).
  """
  h = tf.cast(height, tf.float32) * tf.ones_like(draws[:, 0])
  w = tf.cast(width, tf.float32) * tf.ones_like(draws[:, 0])
  tries = tf.reshape(draws[:, :4 * CROP_TRIES], [-1, CROP_TRIES, 4])
  target = (h * w)[:, None] * (area[0] + (area[1] - area[0]) * tries[..., 0])
  low, high = np.log(ASPECT_RATIOS[0]), np.log(ASPECT_RATIOS[1])
  ratio = tf.exp(low + (high - low) * tries[..., 1])
  crop_w = tf.round(tf.sqrt(target * ratio))
  crop_h = tf.round(tf.sqrt(target / ratio))
  fits = (crop_w >= 1) & (crop_h >= 1) & (crop_w <= w[:, None]) & (crop_h <= h[:, None])
  top = tf.floor(tries[..., 2] * (h[:, None] - crop_h + 1))
  left = tf.floor(tries[..., 3] * (w[:, None] - crop_w + 1))
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)

  def pick(x: tf.Tensor) -> tf.Tensor:
    return tf.gather(x, first, axis=1, batch_dims=1)
  # Fallback: the whole image, cut to the allowed aspect ratio if it lies outside.
  in_ratio = w / h
  fall_w = tf.where(in_ratio > ASPECT_RATIOS[1], tf.round(h * ASPECT_RATIOS[1]), w)
  fall_h = tf.where(in_ratio < ASPECT_RATIOS[0], tf.round(w / ASPECT_RATIOS[0]), h)
  any_fits = tf.reduce_any(fits, axis=1)
  crop_h = tf.where(any_fits, pick(crop_h), fall_h)
  crop_w = tf.where(any_fits, pick(crop_w), fall_w)
  top = tf.where(any_fits, pick(top), tf.floor((h - fall_h) / 2))
  left = tf.where(any_fits, pick(left), tf.floor((w - fall_w) / 2))
  return tf.stack([top, left, top + crop_h - 1, left + crop_w - 1], axis=1)


def resized_crops(images: tf.Tensor, boxes: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
  """uint8 [n, H, W, C] and pixel boxes [n, 4] (`resized_crop_boxes`) -> uint8 [n, *size, C]: each
  box's pixels resized bilinearly to `size` (corner pixels map to corner pixels)."""
  # crop_and_resize maps a box edge at 1.0 to the last pixel, and a float error past it reads its
  # extrapolation value (0): a mirrored extra row and column make the edge safe.
  images = tf.pad(tf.cast(images, tf.float32), [[0, 0], [0, 1], [0, 1], [0, 0]], mode='SYMMETRIC')
  shape = tf.cast(tf.shape(images)[1:3] - 1, tf.float32)
  scale = tf.concat([shape, shape], axis=0)
  crops = tf.image.crop_and_resize(images, boxes / scale, tf.range(tf.shape(images)[0]), size,
                                   method='bilinear')
  return _to_uint8(crops)


def flip_where(images: tf.Tensor, draws: tf.Tensor) -> tf.Tensor:
  """[n, H, W, C] mirrored left to right where the position's flip draw is below 1/2."""
  flip = draws[:, -1] < 0.5
  return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def _narrow(value: tf.Tensor) -> tf.Tensor:
  """int64/bool -> int32 and float64 -> float32: what JAX computes with by default."""
  if value.dtype.is_floating:
    return tf.cast(value, tf.float32)
  return tf.cast(value, tf.int32)


def offset_block(seed: int, crop_padding: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns block -> int32 [OFFSET_BLOCK, 2]: the (dy, dx) crop offsets of positions in that block."""
  key = tf.constant(derive_key(seed, AUGMENT), tf.int64)

  def draw(block: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([OFFSET_BLOCK, 2], seed=tf.stack([key, block]), minval=0,
                                       maxval=2 * crop_padding + 1, dtype=tf.int32, alg='philox')

  return draw


def random_crop(images: tf.Tensor, offsets: tf.Tensor, padding: int) -> tf.Tensor:
  """Zero-pads [n, H, W, C] by `padding` and crops back to H x W at per-example (dy, dx) `offsets`."""
  height, width = images.shape[1], images.shape[2]
  padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
  rows = offsets[:, :1] + tf.range(height)[None]  # [n, H]
  cols = offsets[:, 1:] + tf.range(width)[None]  # [n, W]
  padded = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(padded, cols, axis=2, batch_dims=1)


def all_crops(images: np.ndarray, padding: int) -> np.ndarray:
  """[M, H, W, C] -> [M * (2p+1)^2, H, W, C]: every crop of every image; row m*(2p+1)^2 + dy*(2p+1) + dx.

  Precomputed once for small in-memory sets, so that augmenting is a gather, not per-batch pixel work.
  """
  height, width = images.shape[1:3]
  padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
  return np.ascontiguousarray(np.moveaxis(windows, 3, -1)).reshape(-1, *images.shape[1:])


def normalizer(normalize: tuple[Any, Any] | None) -> Callable[[tf.Tensor], tf.Tensor]:
  """uint8 images -> float32: x/255, then (x - mean) / std when a (mean, std) pair is given."""

  def apply(images: tf.Tensor) -> tf.Tensor:
    images = tf.cast(images, tf.float32) / 255.0
    if normalize is not None:
      mean, std = normalize
      images = (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return images

  return apply
