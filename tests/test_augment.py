"""On-device augmentation: each op against a plain NumPy/SciPy/colorsys reference, the batch against its
randomness contract (per key, per global example index, independent of the device layout)."""
from __future__ import annotations

import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtl import augment, image_ops
from jtl.errors import ConfigError

RNG = np.random.default_rng(0)
DIGITS = RNG.uniform(0.0, 1.0, (16, 8, 8, 1)).astype(np.float32)
RGB = RNG.uniform(0.0, 1.0, (8, 32, 32, 3)).astype(np.float32)
# Digits: the defaults plus blur and noise, so every op that acts on C = 1 runs.
DIGITS_CFG = dict(blur_prob=0.5, noise_prob=0.5)
# RGB: every op on, with probabilities that leave some examples untouched by each.
RGB_CFG = dict(crop_scale=(0.2, 1.0), flip_prob=0.5, blur_prob=0.5, blur_sigma=(0.1, 2.0),
               noise_prob=0.5, grayscale_prob=0.3)

# One compilation per (function, input sharding), shared by the tests below.
augment_rgb = jax.jit(lambda x, k, offset: augment.augment(x, k, RGB_CFG, index_offset=offset))
augment_digits = jax.jit(functools.partial(augment.augment, cfg=DIGITS_CFG))
views_digits = jax.jit(functools.partial(augment.views, cfg=DIGITS_CFG, num_views=2))
# Single ops jitted: one compilation per shape instead of one per primitive (eager dispatch).
adjust_hue = jax.jit(image_ops.adjust_hue)
color_jitter = jax.jit(image_ops.color_jitter, static_argnums=3)
resized_crop = jax.jit(image_ops.resized_crop)
gaussian_blur = jax.jit(image_ops.gaussian_blur, static_argnums=2)
warp = jax.jit(image_ops.warp)
scale_and_translate = jax.jit(jax.image.scale_and_translate, static_argnums=(1, 2, 5))


# ---------------------------------------------------------------- plain references


def np_gray(x):
  return np.repeat((x @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=-1)


def np_hue(x, delta):
  flat = [colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
          for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3).astype(np.float64))]
  return np.asarray(flat).reshape(x.shape)


NP_OPS = (lambda x, f: x * f,
          lambda x, f: (x - x.mean(axis=(0, 1))) * f + x.mean(axis=(0, 1)),
          lambda x, f: np_gray(x) + f * (x - np_gray(x)),
          np_hue)


# ---------------------------------------------------------------- single-image ops


def test_brightness_contrast_saturation_grayscale_match_formulas():
  x = RGB[0, :6, :5]
  np.testing.assert_allclose(image_ops.adjust_brightness(x, 1.7), x * 1.7, rtol=1e-6)
  mean = x.mean(axis=(0, 1))
  np.testing.assert_allclose(image_ops.adjust_contrast(x, 0.3), (x - mean) * 0.3 + mean, atol=1e-6)
  np.testing.assert_allclose(image_ops.adjust_saturation(x, 1.6), NP_OPS[2](x, 1.6), atol=1e-6)
  np.testing.assert_allclose(image_ops.adjust_saturation(x, 0.0), np_gray(x), atol=1e-6)
  np.testing.assert_allclose(image_ops.to_grayscale(x), np_gray(x), atol=1e-6)
  gray = np.repeat(x[..., :1], 3, axis=-1)
  np.testing.assert_allclose(image_ops.to_grayscale(gray), gray, atol=1e-6)
  # One channel: contrast uses its own mean; colour ops leave it alone.
  d = DIGITS[0]
  np.testing.assert_allclose(image_ops.adjust_contrast(d, 2.0), 2.0 * d - d.mean(), atol=1e-6)
  for op in (image_ops.to_grayscale, lambda im: image_ops.adjust_saturation(im, 0.2),
             lambda im: adjust_hue(im, 0.3)):
    np.testing.assert_array_equal(op(d), d)


@pytest.mark.parametrize("delta", [0.0, 0.3, -0.45])
def test_hue_matches_colorsys(delta):
  x = RGB[1, :4, :4]
  np.testing.assert_allclose(adjust_hue(x, delta), np_hue(x, delta), atol=1e-5)


def test_hue_of_pure_colours_and_gray():
  red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
  np.testing.assert_allclose(adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-6)
  gray = np.full((2, 2, 3), 0.4, np.float32)
  np.testing.assert_allclose(adjust_hue(gray, 0.25), gray, atol=1e-7)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0)])
def test_color_jitter_applies_ops_in_order_with_clipping(order):
  x = RGB[2, :4, :4]
  factors = (1.8, 0.6, 1.4, 0.2)
  expected = x.astype(np.float64)
  for op_index in order:
    expected = np.clip(NP_OPS[op_index](expected, factors[op_index]), 0.0, 1.0)
  out = color_jitter(x, jnp.asarray(factors), jnp.asarray(order), (0.0, 1.0))
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_color_jitter_neutral_factors_are_identity():
  x = RGB[3, :4, :4]
  out = color_jitter(x, jnp.asarray([1.0, 1.0, 1.0, 0.0]), jnp.asarray([2, 0, 3, 1]), (0.0, 1.0))
  np.testing.assert_allclose(out, x, atol=1e-6)


def test_flip():
  x = RGB[0]
  np.testing.assert_array_equal(image_ops.flip(x, True), x[:, ::-1])
  np.testing.assert_array_equal(image_ops.flip(x, False), x)
  np.testing.assert_array_equal(image_ops.flip(image_ops.flip(x, True), True), x)


@pytest.mark.parametrize("image", [DIGITS[0], RGB[0]], ids=["8x8x1", "32x32x3"])
def test_full_box_crop_is_identity(image):
  box = image_ops.crop_box(jnp.asarray(RNG.uniform(size=image_ops.CROP_DRAWS), jnp.float32), (1, 1), (1, 1))
  np.testing.assert_array_equal(box, augment.FULL_BOX)
  np.testing.assert_allclose(resized_crop(image, box), image, atol=1e-6)


def test_resized_crop_of_a_linear_ramp_is_analytic():
  # Bilinear resampling reproduces a linear function exactly away from the borders.
  rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
  ramp = (cols + 10 * rows)[..., None].astype(np.float32)
  top, left, height, width = 0.25, 0.125, 0.5, 0.75
  out = resized_crop(ramp, jnp.asarray([top, left, height, width]))
  # Output pixel o (centre o + 0.5) reads input position top*8 + (o + 0.5)*height, where pixel i sits
  # at i + 0.5.
  src_rows = top * 8 + (np.arange(8) + 0.5) * height - 0.5
  src_cols = left * 8 + (np.arange(8) + 0.5) * width - 0.5
  np.testing.assert_allclose(out[..., 0], src_cols[None, :] + 10 * src_rows[:, None], atol=1e-4)


def test_resized_crop_matches_scale_and_translate():
  # jax.image's general resampler as the reference: crop [top, top + height) -> scale 1/height.
  image = RGB[4, :12, :16]
  for box in ([0.1, 0.3, 0.7, 0.5], [0.0, 0.0, 0.35, 1.0], [0.45, 0.2, 0.55, 0.8]):
    box = np.asarray(box, np.float32)
    scale = 1.0 / box[2:]
    expected = scale_and_translate(image, image.shape, (0, 1), scale,
                                   -box[:2] * np.array([12, 16]) * scale, "linear")
    np.testing.assert_allclose(resized_crop(image, box), expected, atol=1e-5)


@pytest.mark.parametrize("aspect, ratio", [(1.0, (0.5, 2.0)), (2.0, (1.0, 4.0))])
def test_crop_box_draws_area_and_ratio_in_range(aspect, ratio):
  scale = (0.1, 0.5)  # with these ratios every candidate fits, so the first is taken: no bias
  uniforms = jnp.asarray(RNG.uniform(size=(2000, image_ops.CROP_DRAWS)), jnp.float32)
  boxes = np.asarray(jax.jit(jax.vmap(lambda u: image_ops.crop_box(u, scale, ratio, aspect)))(uniforms))
  top, left, height, width = boxes.T
  area, pixel_ratio = height * width, width / height * aspect
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + height <= 1 + 1e-6) and np.all(left + width <= 1 + 1e-6)
  assert np.all((area >= scale[0] - 1e-6) & (area <= scale[1] + 1e-6))
  assert np.all((pixel_ratio >= ratio[0] - 1e-5) & (pixel_ratio <= ratio[1] + 1e-5))
  assert abs(area.mean() - 0.3) < 0.01  # uniform over the scale range
  assert abs(np.log(pixel_ratio).mean() - np.log(ratio).mean()) < 0.05  # log-uniform


def test_gaussian_blur_matches_scipy_and_keeps_constants_and_mean():
  for image, sigma, radius in ((DIGITS[0], 0.8, 3), (RGB[0, :12, :10], 1.5, 5), (DIGITS[1], 3.0, 7)):
    out = np.asarray(gaussian_blur(image, sigma, radius))
    # scipy's "reflect" is the half-sample symmetric padding; truncate fixes the same radius.
    expected = scipy.ndimage.gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0),
                                             mode="reflect", truncate=radius / sigma)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=1e-6)
    constant = np.full_like(image, 0.37)
    np.testing.assert_allclose(gaussian_blur(constant, sigma, radius), constant, atol=1e-6)


def test_rotation_matches_scipy():
  """`warp` at an angle is scipy.ndimage.rotate (about the centre, bilinear, border pixels repeated)."""
  image = RGB[0, :20, :14]
  for degrees in (0.0, 12.0, -30.0, 90.0):
    out = np.asarray(warp(image, np.deg2rad(degrees), None))
    expected = scipy.ndimage.rotate(image.astype(np.float64), degrees, axes=(1, 0), reshape=False,
                                    order=1, mode="nearest")
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_elastic_distortion_matches_scipy():
  """Simard et al.'s field (2u - 1, Gaussian-smoothed, times alpha) and its bilinear resampling against
  scipy's gaussian_filter and map_coordinates; alpha 0 is the identity."""
  image, uniforms = DIGITS[2, :, :, 0], RNG.uniform(size=(8, 8, 2)).astype(np.float32)
  alpha, sigma = 3.0, 1.5
  field = np.asarray(image_ops.elastic_field(uniforms, alpha, sigma))
  radius = image_ops.blur_radius(sigma, 8)
  expected_field = alpha * scipy.ndimage.gaussian_filter(2.0 * uniforms.astype(np.float64) - 1.0,
                                                         sigma=(sigma, sigma, 0), mode="reflect",
                                                         truncate=radius / sigma)
  np.testing.assert_allclose(field, expected_field, atol=1e-5)
  rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
  expected = scipy.ndimage.map_coordinates(image.astype(np.float64),
                                           [rows + field[..., 0], cols + field[..., 1]], order=1,
                                           mode="nearest")
  np.testing.assert_allclose(np.asarray(warp(image[..., None], 0.0, field))[..., 0], expected,
                             atol=1e-5)
  np.testing.assert_array_equal(warp(DIGITS[2], 0.0, np.zeros((8, 8, 2), np.float32)), DIGITS[2])


def test_geometric_ops_leave_the_other_draws_alone():
  """Rotation and elastic distortion draw from a second stream: with the rest off they change every
  view; with them off the views are what they were (the digits' recipe is unchanged)."""
  key = jax.random.key(5)
  geometric = dict(crop_prob=0.0, jitter_prob=0.0, rotate_prob=1.0, elastic_prob=1.0,
                   elastic_alpha=2.0, elastic_sigma=1.0)
  out = np.asarray(jax.jit(lambda x: augment.augment(x, key, geometric))(DIGITS))
  assert np.all(np.abs(out - DIGITS).max(axis=(1, 2, 3)) > 1e-3)
  assert out.min() >= 0 and out.max() <= 1  # bilinear resampling stays in range
  off = dict(DIGITS_CFG, rotate_prob=0.0, elastic_prob=0.0)
  np.testing.assert_array_equal(jax.jit(lambda x: augment.augment(x, key, off))(DIGITS),
                                augment_digits(DIGITS, key))


def test_blur_radius_fits_the_image():
  assert image_ops.blur_radius(2.0, 224) == 6
  assert image_ops.blur_radius(2.0, 8) == 6
  assert image_ops.blur_radius(5.0, 8) == 7


def test_uniform_to_normal():
  uniforms = jnp.asarray(np.append(RNG.uniform(size=20000), 0.0), jnp.float32)
  normal = np.asarray(image_ops.uniform_to_normal(uniforms))
  assert np.all(np.isfinite(normal))
  assert abs(normal.mean()) < 0.03 and abs(normal.std() - 1) < 0.03
  np.testing.assert_allclose(image_ops.add_noise(DIGITS[0], normal[:64].reshape(8, 8, 1), 0.1),
                             DIGITS[0] + 0.1 * normal[:64].reshape(8, 8, 1), rtol=1e-6)


# ---------------------------------------------------------------- the batch


def test_augment_is_deterministic_per_key_and_random_per_example():
  key = jax.random.key(0)
  same_images = np.repeat(RGB[:1], 8, axis=0)
  out = np.asarray(augment_rgb(same_images, key, 0))
  assert out.shape == same_images.shape and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1
  np.testing.assert_array_equal(augment_rgb(same_images, key, 0), out)
  assert not np.allclose(augment_rgb(same_images, jax.random.key(1), 0), out)
  # Identical inputs, different positions in the batch: different views.
  differences = [np.abs(out[i] - out[j]).max() for i in range(8) for j in range(i)]
  assert min(differences) > 1e-3


def test_augment_randomness_follows_the_global_example_index():
  key = jax.random.key(3)
  full = np.asarray(augment_rgb(RGB, key, 0))
  rolled = np.asarray(augment_rgb(np.roll(RGB, -3, axis=0), key, 3))
  # Example i of `rolled` is example i + 3 of the batch, and it is told so by index_offset.
  np.testing.assert_allclose(rolled[:5], full[3:], atol=1e-6)


def test_everything_off_is_identity():
  off = dict(crop_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, noise_prob=0.0)
  for images in (DIGITS, RGB[:2]):
    out = jax.jit(lambda x: augment.augment(x, jax.random.key(0), off))(images)
    np.testing.assert_array_equal(out, images)


def test_neutral_settings_at_probability_one_are_identity():
  # Every gate open, every op neutral: a full-image crop, grayscale of gray images, zero jitter/noise.
  gray = np.repeat(RGB[:4, :16, :16, :1], 3, axis=-1)
  neutral = dict(crop_prob=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=1.0,
                 strength=0.0, grayscale_prob=1.0, noise_prob=1.0, noise_std=0.0)
  out = jax.jit(lambda x: augment.augment(x, jax.random.key(0), neutral))(gray)
  np.testing.assert_allclose(out, gray, atol=1e-6)


def test_views_are_independent_and_do_not_depend_on_the_device_layout():
  assert len(jax.devices()) == 8
  key = jax.random.key(7)
  out = np.asarray(views_digits(DIGITS, key))
  assert out.shape == (16, 2, 8, 8, 1) and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1
  assert np.abs(out[:, 0] - out[:, 1]).max(axis=(1, 2, 3)).min() > 1e-3
  np.testing.assert_allclose(out[:, 1], augment_digits(DIGITS, jax.random.fold_in(key, 1)), atol=1e-6)
  # Two examples per device: a local index in place of the global one would repeat draws.
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.device_put(DIGITS, NamedSharding(mesh, PartitionSpec("data")))
  out_sharded = views_digits(sharded, key)
  assert len(out_sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out_sharded), out, atol=1e-6)


# ---------------------------------------------------------------- config


def test_defaults_validate_and_suit_digits():
  cfg = augment.default_config()
  augment.validate(cfg)
  assert cfg.flip_prob == 0.0 and cfg.crop_prob > 0 and cfg.jitter_prob > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(crop_prb=0.5), r"--config\.augment\.crop_prb \(did you mean 'crop_prob'\?\)"),
    (dict(flip_prob=1.5), r"flip_prob=1\.5 must be a probability .*--config\.augment\.flip_prob"),
    (dict(brightness=-0.1), r"--config\.augment\.brightness"),
    (dict(hue=-0.1, strength=0.0), r"--config\.augment\.hue"),
    (dict(hue=0.4, strength=2.0), r"augment\.hue=0\.4 times strength=2\.0"),
    (dict(crop_scale=(0.0, 1.0)), r"--config\.augment\.crop_scale"),
    (dict(crop_scale=(0.5, 1.2)), r"--config\.augment\.crop_scale"),
    (dict(crop_ratio=(2.0, 1.0)), r"min > max.*--config\.augment\.crop_ratio"),
    (dict(blur_sigma=(0.5,)), r"pair.*--config\.augment\.blur_sigma"),
    (dict(noise_std=float("nan")), r"--config\.augment\.noise_std"),
    (dict(clip_range=(1.0, 1.0)), r"--config\.augment\.clip_range"),
    (dict(jitter_prob=True), r"--config\.augment\.jitter_prob"),
    (dict(rotate_prob=2.0), r"--config\.augment\.rotate_prob"),
    (dict(elastic_sigma=0.0), r"elastic_sigma=0\.0 must be a finite number > 0"),
])
def test_validate_rejects_bad_values(overrides, message):
  cfg = augment.default_config().to_dict()
  cfg.update(overrides)
  with pytest.raises(ConfigError, match=message):
    augment.validate(cfg)
  with pytest.raises(ConfigError):
    augment.augment(DIGITS, jax.random.key(0), overrides)  # fails at trace time, before compiling


def test_clip_range_none_is_allowed():
  cfg = augment.default_config()
  cfg.clip_range = None
  augment.validate(cfg)
