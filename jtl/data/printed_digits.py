"""`printed_digits`: printed digits in the format of scikit-learn's 8x8 digits, a real domain shift.

The source domain for domain adaptation onto `sklearn_digits` (handwritten). Every example is the digit
glyph of a TrueType font shipped inside matplotlib (`matplotlib/mpl-data/fonts/ttf/`), jittered, then
pushed through a re-creation of the preprocessing that made the UCI optdigits (which scikit-learn's
digits are; Alpaydin & Kaynak 1998, with NIST's normalisation, Garris et al. 1994, NISTIR 5469): a
size-normalised 32x32 binary bitmap, cut into non-overlapping 4x4 blocks, each block's "on" pixels
counted (0..16). Offline, deterministic, about 2 s to prepare.

Fonts (`FONTS`, 21): DejaVu Sans, Sans Mono and Serif (4 faces each), STIXGeneral (4 faces), and the
Computer Modern cmr10, cmb10, cmss10, cmti10, cmtt10. `usable_fonts()` derives the list: a font is kept
iff its cmap maps '0'..'9' to glyphs named zero..nine and the ten renders are non-empty and pairwise
different. That drops the symbol and size fonts (cmex10, cmsy10: '0'..'9' map to symbols; STIXSiz*,
STIXNonUni*, DejaVu*Display: no digits; LastResortHE: one placeholder glyph for all) and cmmi10, whose
digits are old-style figures (with descenders), unlike handwritten lining digits.

One example (digit k, font f, generator `rng`):
1. Render k at 64 px, centred on a 128x128 canvas; blur it (Gaussian, sigma = 2 px) as a float image.
2. Affine jitter about the centre, A = R(theta) @ Shear(s) @ diag(a, 1/a): rotation theta ~ U(-10, 10)
   degrees, horizontal shear (slant) s ~ U(-0.2, 0.2), aspect a = exp(U(-0.15, 0.15)). Overall scale
   and translation are not drawn: step 3 normalises them away, as it does for the handwriting.
3. Size normalisation, measured on scikit-learn's digits: all 1,797 images have ink in all 8 block rows,
   and 77% span exactly 6 block columns (cols 0 and 7 are inked in 1% / 12%). So the bounding box of the
   jittered glyph (its pixels >= 50% before the blur) is scaled to the full 32 px height, and its width
   by the same factor but at most 20 px (wider glyphs are squeezed), then centred horizontally and
   shifted by U(-1, 1) px (translation jitter). Resampled bilinearly straight from the blurred glyph.
4. Stroke-width normalisation and stroke-thickness jitter: the 32x32 bitmap is the N most inked pixels,
   N ~ round(Normal(313, 35)) clipped to [240, 400], the measured on-pixel count of the handwritten
   bitmaps (mean 313, sd 35; their ink is nearly the same for every class, 0.30-0.32: NIST's
   preprocessing evidently normalised stroke width). Thresholding a blurred glyph below/above its 50%
   level is, up to curvature, a dilation/erosion by a disc, so this is a dilation/erosion of
   continuous radius (ties broken at random); a thickened stroke may pass the box edge by a pixel.
5. 4x4 block counts -> 8x8 in 0..16 -> round(x * 255 / 16) as uint8, exactly as `sklearn_digits`.

Two builder configs (`printed_digits` is `printed_digits/plain`):
  plain    the above (v1.0.0's data): train 2,000.
  elastic  handwriting-like variety (`printed_digits/elastic`, the demo's pretraining): before step 2,
           an elastic distortion of the blurred glyph (Simard et al. 2003: a displacement field of
           uniform(-1, 1) noise per axis, Gaussian-smoothed with sigma 12 canvas px, times alpha 300, so
           about 4 px RMS, 6% of the glyph's height), with the bounding box of step 3 taken from the
           distorted glyph (>= 50%); rotation U(-10, 10) -> U(-15, 15) degrees, shear U(-0.2, 0.2)
           -> U(-0.3, 0.3); train 10,000. About 3.5 ms an example (35 s to prepare). A pixel
           classifier trained on its digits 5-9 gets 0.760 on handwritten 5-9 (test split), against
           0.626 from plain's; `domain_report(ELASTIC)`.

Splits: `train` 2,000 (elastic: 10,000) and `test` 500, each balanced (example i has label i % 10
and font FONTS[(i // 10) % 21]); both use all 21 fonts (fonts are shared: the test split is
in-domain), with independent jitter streams (seed 0, stream 0 for train, 1 for test).

How close the domains are (`domain_report()`; scikit-learn LogisticRegression on pixels / 255):
mean ink 0.306 printed vs 0.305 handwritten; mean |difference of the per-pixel mean images| 0.068 (in
[0, 1] units). Trained on printed train: 1.000 on printed test, 0.639 on all 1,797 handwritten digits,
0.630 on the `sklearn_digits` test split (per class 0.24 for 9 up to 1.00 for 0); trained on
`sklearn_digits` train: 0.953 on its test split. Chance is 0.1: the ~0.32 gap is the shift that domain
adaptation tries to close. No printed test image equals a printed train image.

Determinism: fixed seeds and VERSION; the pixels depend on the installed fonts and FreeType/Pillow, so
bump the VERSION when those change the output.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow_datasets as tfds
from absl import logging

FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf",
    "cmti10.ttf", "cmtt10.ttf",
)
SPLIT_SIZES = {"train": 2000, "test": 500}  # plain's; a Variant sets its own train_size

_SEED = 0  # Fixed forever: changing it (or any constant below) changes the data: bump VERSION.
_GLYPH_PX = 64  # Font size of the render.
PROGRESS_EVERY_S = 5.0  # a preparation that takes longer says how far it got this often
_CANVAS = 128  # Side of the render canvas: room for the glyph and its blur.
_BLUR_SIGMA = 2.0  # In canvas pixels (about 1.4 px of the 32x32 box).
_MAX_LOG_ASPECT = 0.15
_BOX = 32  # The optdigits bitmap side.
_MAX_WIDTH = 20.0  # Widest glyph in the box, from the measured handwritten column extent.
_MAX_SHIFT = 1.0  # Horizontal translation jitter in box pixels.
_INK_MEAN, _INK_STD, _INK_RANGE = 313.0, 35.0, (240, 400)  # On pixels of the 32x32 bitmap.
_DIGIT_GLYPH_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def font_dir() -> str:
  """The folder of TrueType fonts inside the installed matplotlib."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (slow import, only when building)
  return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _render(font_file: str, digit: int) -> np.ndarray:
  """The anti-aliased glyph of `digit`, centred on the canvas: float32 [128, 128] in 0..255."""
  font = ImageFont.truetype(os.path.join(font_dir(), font_file), _GLYPH_PX)
  left, top, right, bottom = font.getbbox(str(digit))
  canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
  origin = ((_CANVAS - (right - left)) / 2 - left, (_CANVAS - (bottom - top)) / 2 - top)
  ImageDraw.Draw(canvas).text(origin, str(digit), fill=255, font=font)
  return np.asarray(canvas, np.float32)


def _has_lining_digits(path: str) -> bool:
  """Whether the font's cmap maps '0'..'9' to the standard glyph names zero..nine."""
  from fontTools.ttLib import TTFont  # pylint: disable=g-import-not-at-top  (a matplotlib dependency)
  cmap = TTFont(path, lazy=True).getBestCmap() or {}
  return tuple(cmap.get(ord(str(d))) for d in range(10)) == _DIGIT_GLYPH_NAMES


def _has_real_digits(font_file: str) -> bool:
  """Lining digit glyphs in the cmap, whose ten renders are non-empty and pairwise different."""
  if not _has_lining_digits(os.path.join(font_dir(), font_file)):
    return False
  shapes = [_render(font_file, d) >= 128 for d in range(10)]
  return all(s.any() for s in shapes) and len({s.tobytes() for s in shapes}) == 10


def usable_fonts() -> tuple[str, ...]:
  """File names (sorted) of matplotlib's fonts with ten real, distinct, non-empty digit glyphs."""
  return tuple(name for name in sorted(os.listdir(font_dir()))
               if name.endswith(".ttf") and _has_real_digits(name))


@functools.lru_cache(maxsize=None)
def _glyph(font_file: str, digit: int) -> tuple[Image.Image, np.ndarray]:
  """(blurred glyph, a float PIL image; centres (x, y) of its pixels >= 50%, from the canvas centre)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  image = _render(font_file, digit)
  centres = np.argwhere(image >= 128)[:, ::-1] + 0.5 - _CANVAS / 2
  blurred = ndimage.gaussian_filter(image, _BLUR_SIGMA).astype(np.float32)
  return Image.fromarray(blurred), centres  # float32 -> mode "F".


@dataclasses.dataclass(eq=False)
class Variant(tfds.core.BuilderConfig):
  """How an example is jittered (see the module docstring), and how many train examples there are."""
  max_rotation_deg: float = 10.0
  max_shear: float = 0.2
  elastic_alpha: float = 0.0  # 0: no elastic distortion
  elastic_sigma: float = 12.0  # canvas px
  train_size: int = 2000

  def split_sizes(self) -> dict[str, int]:
    return {**SPLIT_SIZES, "train": self.train_size}


PLAIN = Variant(name="plain", description="Fonts, affine jitter, optdigits preprocessing.")
ELASTIC = Variant(name="elastic", description="As plain, plus elastic distortion, wider rotation and "
                  "shear, 10,000 train examples: closer to handwriting.",
                  max_rotation_deg=15.0, max_shear=0.3, elastic_alpha=300.0, train_size=10000)


def _elastic(glyph: Image.Image, variant: Variant, rng: np.random.Generator
             ) -> tuple[Image.Image, np.ndarray]:
  """The glyph under a random smooth displacement field, and the centres of its pixels >= 50%."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  image = np.asarray(glyph, np.float32)
  dx, dy = (ndimage.gaussian_filter(rng.uniform(-1, 1, image.shape), variant.elastic_sigma)
            * variant.elastic_alpha for _ in range(2))
  rows, cols = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
  moved = ndimage.map_coordinates(image, [rows + dy, cols + dx], order=1).astype(np.float32)
  centres = np.argwhere(moved >= 127.5)[:, ::-1] + 0.5 - _CANVAS / 2
  return Image.fromarray(moved), centres


def render_example(font_file: str, digit: int, rng: np.random.Generator,
                   variant: Variant = PLAIN) -> np.ndarray:
  """One printed digit as optdigits would have made it: 8x8 block counts, int64 in 0..16."""
  glyph, centres = _glyph(font_file, digit)
  if variant.elastic_alpha:
    glyph, centres = _elastic(glyph, variant, rng)
  theta = np.deg2rad(rng.uniform(-variant.max_rotation_deg, variant.max_rotation_deg))
  shear = rng.uniform(-variant.max_shear, variant.max_shear)
  aspect = np.exp(rng.uniform(-_MAX_LOG_ASPECT, _MAX_LOG_ASPECT))
  rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  jitter = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0 / aspect])
  # Bounding box of the jittered glyph (pixel centres +- half a pixel), about the canvas centre.
  moved = centres @ jitter.T
  low, high = moved.min(0) - 0.5, moved.max(0) + 0.5
  width, height = high - low
  scale_y = _BOX / height
  scale_x = min(scale_y, _MAX_WIDTH / width)
  left = (_BOX - width * scale_x) / 2 + rng.uniform(-_MAX_SHIFT, _MAX_SHIFT)
  # Box point (u, v) -> jittered point (low_x + (u - left) / sx, low_y + v / sy) -> glyph point by
  # the inverse jitter; PIL's AFFINE wants that map from output to input coordinates.
  to_jittered = np.diag([1.0 / scale_x, 1.0 / scale_y])
  unjitter = np.linalg.inv(jitter)
  linear = unjitter @ to_jittered
  offset = unjitter @ np.array([low[0] - left / scale_x, low[1]]) + _CANVAS / 2
  coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
  box = glyph.transform((_BOX, _BOX), Image.Transform.AFFINE, coefficients,
                        Image.Resampling.BILINEAR)
  ink = np.asarray(box, np.float32).ravel()
  n_on = int(np.clip(np.round(rng.normal(_INK_MEAN, _INK_STD)), *_INK_RANGE))
  order = np.lexsort((rng.random(ink.size), -ink))  # Most ink first; random among equals.
  bitmap = np.zeros(ink.size, bool)
  bitmap[order[:n_on]] = True
  bitmap &= ink > 0  # A glyph with fewer inked pixels than N keeps what it has.
  return bitmap.reshape(_BOX // 4, 4, _BOX // 4, 4).sum(axis=(1, 3))


def check_fonts() -> None:
  """Raises RuntimeError if a font of `FONTS` is missing or lacks real digits in this matplotlib."""
  bad = [f for f in FONTS
         if not os.path.exists(os.path.join(font_dir(), f)) or not _has_real_digits(f)]
  if bad:
    raise RuntimeError(f"printed_digits needs matplotlib's fonts {bad} in {font_dir()} (missing or "
                       "without real digit glyphs); install a matplotlib that ships them")


def iterate(split: str, variant: Variant = PLAIN) -> Iterator[tuple[np.ndarray, int, str]]:
  """`split`'s examples one at a time, as rendered: (image uint8 [8, 8, 1], label, font). A line
  says how far rendering got at most every `PROGRESS_EVERY_S` seconds (elastic's 10,000 take
  35-90 s)."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"unknown split {split!r}; use one of {list(SPLIT_SIZES)}")
  rng = np.random.default_rng((_SEED, list(SPLIT_SIZES).index(split)))  # One stream per split.
  n = variant.split_sizes()[split]
  start = last = time.monotonic()
  try:
    for i in range(n):
      label, font = i % 10, FONTS[(i // 10) % len(FONTS)]
      counts = render_example(font, label, rng, variant)
      yield np.round(counts * 255.0 / 16.0).astype(np.uint8)[..., None], label, font
      now = time.monotonic()
      if now - last >= PROGRESS_EVERY_S and i + 1 < n:
        logging.info("printed_digits/%s %s: %d of %d examples rendered (%.0f s, about %.0f s to go)",
                     variant.name, split, i + 1, n, now - start, (now - start) * (n - i - 1) / (i + 1))
        last = now
  finally:
    _glyph.cache_clear()  # ~13 MB of glyphs: not worth holding in a training process.


def generate(split: str, variant: Variant = PLAIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All of `split`: (images uint8 [N, 8, 8, 1] on the 17-level grid, labels int64 [N], fonts [N])."""
  images, labels, fonts = zip(*iterate(split, variant))
  return np.stack(images), np.array(labels, dtype=np.int64), np.array(fonts)


class PrintedDigits(tfds.core.GeneratorBasedBuilder):
  """Digits printed in 21 matplotlib fonts, preprocessed like optdigits into 8x8 block counts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 21 fonts, 2000/500 balanced train/test; configs plain "
                            "and elastic."}
  BUILDER_CONFIGS = [PLAIN, ELASTIC]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Printed digits rendered from matplotlib's fonts, jittered and reduced to 8x8 "
                    "4x4-block counts like the UCI optdigits (scikit-learn's digits), in 0..255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "font": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://matplotlib.org/stable/users/explain/text/fonts.html",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download: the fonts ship inside matplotlib.
    check_fonts()
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # Lazily: TFDS's progress bar then counts rendered examples instead of sitting at 0 for a minute.
    for i, (image, label, font) in enumerate(iterate(split, self.builder_config)):
      # A PIL image is PNG-encoded by Pillow: ~4x cheaper than TFDS's per-example TF encoder.
      yield i, {"image": Image.fromarray(image[..., 0]), "label": int(label), "font": str(font)}


def domain_report(variant: Variant = PLAIN) -> None:
  """Prints how far printed digits are from scikit-learn's (the numbers in the module docstring)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from jtl.data import digits  # pylint: disable=g-import-not-at-top
  (x_tr, y_tr, _), (x_te, y_te, _) = generate("train", variant), generate("test", variant)
  hand, hand_y = digits._digits()  # pylint: disable=protected-access
  split = digits.split_indices()
  flat = lambda x: x.reshape(len(x), -1) / 255.0
  print(f"[{variant.name}] mean ink: printed {x_tr.mean() / 255:.3f}, "
        f"handwritten {hand.mean() / 255:.3f}")
  gap = np.abs(x_tr.mean(0) - hand.mean(0)).mean() / 255
  print(f"mean |mean printed image - mean handwritten image|: {gap:.3f}")
  printed = LogisticRegression(max_iter=5000).fit(flat(x_tr), y_tr)
  print(f"printed -> printed test: {printed.score(flat(x_te), y_te):.3f}")
  print(f"printed -> all handwritten: {printed.score(flat(hand), hand_y):.3f}")
  test = split["test"]
  print(f"printed -> handwritten test split: {printed.score(flat(hand[test]), hand_y[test]):.3f}")
  high, high_test = y_tr >= 5, hand_y[test] >= 5
  five_to_nine = LogisticRegression(max_iter=5000).fit(flat(x_tr[high]), y_tr[high])
  print("printed 5-9 -> handwritten test split 5-9: "
        f"{five_to_nine.score(flat(hand[test][high_test]), hand_y[test][high_test]):.3f}")
  tr = split["train"]
  handwritten = LogisticRegression(max_iter=5000).fit(flat(hand[tr]), hand_y[tr])
  print(f"handwritten train -> handwritten test: {handwritten.score(flat(hand[test]), hand_y[test]):.3f}")
