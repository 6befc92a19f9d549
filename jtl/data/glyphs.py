"""`glyphs`: an Omniglot-style benchmark of characters from 17 scripts, rendered offline.

Omniglot (Lake et al. 2015) has 1,623 handwritten characters from 50 alphabets, 20 drawings each, split
by *alphabet* into background (training) and evaluation scripts. `glyphs` follows that protocol with
printed characters: its classes are the letters of 17 Unicode scripts found in the TrueType fonts that
ship with matplotlib (`matplotlib/mpl-data/fonts/ttf/`), its instances renderings of a letter by the
fonts that have it, each distorted like handwriting. Offline, deterministic, 75-90 s to prepare on
a busy 2-core machine.

Classes (`characters()`: 1,598 with matplotlib's fonts of 2026, 1,238 background and 360 evaluation;
`tests/test_glyphs.py` checks the rules below and at least 1,500 classes in 15 scripts):
1. Candidates: the code points of each script's blocks (`SCRIPTS`) that DejaVu Sans maps, whose
   Unicode category is a letter other than a modifier letter (Lu, Ll, Lt, Lo), with no canonical or
   compatibility decomposition (so no precomposed accented letter or presentation form), plus the 63
   non-empty six-dot Braille cells (category So). No digit is a candidate (every N* category is out), so
   handwritten digits stay an unseen target for transfer.
2. Shape deduplication: each candidate is rendered in DejaVu Sans, cropped to its ink, resized to
   12x12 and binarised at half ink. A candidate whose bitmap equals one already kept is dropped,
   scripts taken in `SCRIPTS` order (background scripts first). This removes shapes shared between
   scripts (Latin A, Greek Alpha, Cyrillic A) and case pairs of one shape (c/C, o/O, s/S), so an
   evaluation class never has a background class of the same shape. A candidate whose bitmap equals that
   of a digit 0-9 is dropped too (Latin O, Cyrillic Ze), as is one whose ink fits in 3 pixels of the
   12x12 box in both directions (dots and bars).

Instances: `INSTANCES` (20) per character. Instance i is drawn by font `fonts[i % len(fonts)]`, where
`fonts` are the faces of `FONTS` whose cmap has the character and whose render is non-empty and not
the font's missing-glyph box (DejaVu Sans/Sans Mono/Serif in four faces each, STIX General in four,
Computer Modern cmr, cmb, cmss, cmti, cmtt: 21 faces; Latin letters have up to 21, most other scripts
only the four DejaVu Sans faces). Each instance, from a generator seeded by (seed, code point):
1. Render the character at 48 px on a 96x96 canvas (cached per font), Gaussian blur sigma 1.5 px.
2. Elastic distortion (Simard et al. 2003): a displacement field of U(-1, 1) noise per axis, Gaussian-
   smoothed with sigma 8 px, times alpha 150 (about 3 px RMS, 6% of the glyph size).
3. Affine jitter about the glyph's centre: rotation U(-10, 10) degrees, shear U(-0.2, 0.2), aspect
   exp(U(-0.15, 0.15)); then the bounding box of the distorted, jittered ink (blurred value >= half) is
   scaled so its longer side is U(36, 44) px of a 56x56 box, centred, shifted by U(-2, 2) px per axis.
4. Stroke-width jitter: the 56x56 box is thresholded at U(0.25, 0.6) of full ink (a lower threshold
   is a thicker stroke), then averaged over 2x2 blocks: 28x28 (Omniglot's usual size) in 0..255, ink
   high, background 0.

Two builder configs; `glyphs` is `glyphs/omniglot`:
  omniglot   the 28x28 images above (the default).
  optdigits  the same characters, fonts and generator draws in the format of scikit-learn's 8x8
             digits (`sklearn_digits`, the UCI optdigits), the target of transfer to handwriting, made
             as `printed_digits` makes its digits: steps 1-3 up to the jitter matrix as above (the
             same elastic field, rotation, shear and aspect), then the optdigits box instead of the
             56x56 one: the bounding box of the distorted, jittered ink is scaled to the full 32 px
             height, its width by the same factor but at most 20 px (a wider glyph is squeezed),
             centred horizontally and shifted by U(-1, 1) px; thresholded at U(0.25, 0.6) of full ink
             as in step 4, the 32x32 bitmap's 4x4 blocks counted (0..16), stored as
             round(count * 255 / 16) in uint8 [8, 8, 1], exactly as `sklearn_digits` stores its pixels.
             Mean ink 0.29 of the bitmap against 0.305 for the handwritten digits.

Splits (by script, never mixed): `train` = the background scripts (`BACKGROUND`), `test` = the
evaluation scripts (`EVALUATION`). Features: `image` uint8 [28, 28, 1]; `label` the character's index
in `characters()` (background characters first, so the test split's labels start where the train
split's end); `alphabet` the script; `family` the font family (sans, sans_mono, serif, stix, cm);
`bold` and `italic` (0/1) of the face; `code_point`.

Determinism: fixed seeds and VERSION (both configs); the pixels depend on the installed fonts, FreeType and Pillow, so
bump the VERSION when those change the output.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import unicodedata
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont
import tensorflow_datasets as tfds

from jtl.data.printed_digits import font_dir

# (script, code point ranges), background scripts first: deduplication keeps the first of equal shapes.
SCRIPTS = (
    ("latin", ((0x41, 0x24F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF))),
    ("ipa", ((0x250, 0x2AF), (0x1D00, 0x1DBF))),
    ("greek", ((0x370, 0x3E1), (0x3F0, 0x3FF), (0x1F00, 0x1FFF))),
    ("cyrillic", ((0x400, 0x52F), (0xA640, 0xA69F))),
    ("canadian_syllabics", ((0x1400, 0x167F),)),
    ("arabic", ((0x600, 0x6FF), (0x750, 0x77F))),
    ("coptic", ((0x3E2, 0x3EF), (0x2C80, 0x2CFF))),
    ("old_italic", ((0x10300, 0x1032F),)),
    ("braille", ((0x2801, 0x283F),)),
    # Evaluation scripts.
    ("armenian", ((0x530, 0x58F),)),
    ("georgian", ((0x10A0, 0x10FF), (0x2D00, 0x2D2F))),
    ("hebrew", ((0x590, 0x5FF),)),
    ("nko", ((0x7C0, 0x7FF),)),
    ("lao", ((0xE80, 0xEFF),)),
    ("tifinagh", ((0x2D30, 0x2D7F),)),
    ("lisu", ((0xA4D0, 0xA4FF),)),
    ("ogham", ((0x1680, 0x169F),)),
)
BACKGROUND = tuple(name for name, _ in SCRIPTS[:9])
EVALUATION = tuple(name for name, _ in SCRIPTS[9:])
# (file, family, bold, italic); the reference face (deduplication, candidates) comes first.
FONTS = (
    ("DejaVuSans.ttf", "sans", 0, 0), ("DejaVuSans-Bold.ttf", "sans", 1, 0),
    ("DejaVuSans-Oblique.ttf", "sans", 0, 1), ("DejaVuSans-BoldOblique.ttf", "sans", 1, 1),
    ("DejaVuSansMono.ttf", "sans_mono", 0, 0), ("DejaVuSansMono-Bold.ttf", "sans_mono", 1, 0),
    ("DejaVuSansMono-Oblique.ttf", "sans_mono", 0, 1),
    ("DejaVuSansMono-BoldOblique.ttf", "sans_mono", 1, 1),
    ("DejaVuSerif.ttf", "serif", 0, 0), ("DejaVuSerif-Bold.ttf", "serif", 1, 0),
    ("DejaVuSerif-Italic.ttf", "serif", 0, 1), ("DejaVuSerif-BoldItalic.ttf", "serif", 1, 1),
    ("STIXGeneral.ttf", "stix", 0, 0), ("STIXGeneralBol.ttf", "stix", 1, 0),
    ("STIXGeneralItalic.ttf", "stix", 0, 1), ("STIXGeneralBolIta.ttf", "stix", 1, 1),
    ("cmr10.ttf", "cm", 0, 0), ("cmb10.ttf", "cm", 1, 0), ("cmss10.ttf", "cm", 0, 0),
    ("cmti10.ttf", "cm", 0, 1), ("cmtt10.ttf", "cm", 0, 0),
)
FAMILIES = ("sans", "sans_mono", "serif", "stix", "cm")
INSTANCES = 20
IMAGE_SIZE = 28

_SEED = 0  # Fixed forever: changing it (or any constant below) changes the data: bump VERSION.
_GLYPH_PX, _CANVAS, _BLUR_SIGMA = 48, 96, 1.5
_ELASTIC_ALPHA, _ELASTIC_SIGMA = 150.0, 8.0
_MAX_ROTATION_DEG, _MAX_SHEAR, _MAX_LOG_ASPECT = 10.0, 0.2, 0.15
_BOX = 2 * IMAGE_SIZE  # rendered at twice the size, then 2x2-averaged
_SIDE_RANGE, _MAX_SHIFT, _THRESHOLD_RANGE = (36.0, 44.0), 2.0, (0.25, 0.6)
_DEDUP_SIDE, _MIN_EXTENT = 12, 3
# The optdigits config: printed_digits' box (jtl/data/printed_digits.py) and optdigits' 4x4 blocks.
_OPT_BOX, _OPT_BLOCK, _OPT_MAX_WIDTH, _OPT_MAX_SHIFT = 32, 4, 20.0, 1.0
_OPT_SIDE = _OPT_BOX // _OPT_BLOCK  # 8
_LETTERS = ("Lu", "Ll", "Lt", "Lo")


class Character(NamedTuple):
  label: int
  code_point: int
  script: str
  fonts: tuple[int, ...]  # indices into FONTS


def _font_path(index: int) -> str:
  return os.path.join(font_dir(), FONTS[index][0])


@functools.lru_cache(maxsize=None)
def _font(index: int) -> ImageFont.FreeTypeFont:
  return ImageFont.truetype(_font_path(index), _GLYPH_PX)


@functools.lru_cache(maxsize=None)
def _charmap(index: int) -> frozenset[int]:
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top  (slow import, building only)
  return frozenset(ft2font.FT2Font(_font_path(index)).get_charmap())


def _render(font_index: int, char: str) -> np.ndarray:
  """The anti-aliased glyph, its ink box centred on the canvas: float32 [96, 96] in 0..255."""
  font = _font(font_index)
  left, top, right, bottom = font.getbbox(char)
  canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
  origin = ((_CANVAS - (right - left)) / 2 - left, (_CANVAS - (bottom - top)) / 2 - top)
  ImageDraw.Draw(canvas).text(origin, char, fill=255, font=font)
  return np.asarray(canvas, np.float32)


def _shape_key(image: np.ndarray) -> bytes | None:
  """The ink cropped, resized to 12x12 and binarised; None for (nearly) empty or dot/bar-like ink."""
  rows, cols = np.nonzero(image >= 128)
  if rows.size == 0:
    return None
  crop = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  small = np.asarray(Image.fromarray(crop).resize((_DEDUP_SIDE, _DEDUP_SIDE),
                                                  Image.Resampling.BILINEAR)) >= 128
  ink_rows, ink_cols = np.nonzero(small)
  if ink_rows.size == 0 or (np.ptp(ink_rows) < _MIN_EXTENT and np.ptp(ink_cols) < _MIN_EXTENT):
    return None
  return np.packbits(small).tobytes()


@functools.lru_cache(maxsize=None)
def _missing_glyph(font_index: int) -> bytes:
  """The font's render of an unmapped code point (its .notdef box), to recognise it."""
  return _render(font_index, "\U000F0000").astype(np.uint8).tobytes()


def _has_glyph(font_index: int, code_point: int) -> bool:
  if code_point not in _charmap(font_index):
    return False
  image = _render(font_index, chr(code_point))
  return bool((image >= 128).any()) and image.astype(np.uint8).tobytes() != _missing_glyph(font_index)


def _is_candidate(code_point: int, script: str) -> bool:
  char = chr(code_point)
  if unicodedata.decomposition(char):
    return False
  return unicodedata.category(char) in _LETTERS or script == "braille"


@functools.lru_cache(maxsize=1)
def characters() -> tuple[Character, ...]:
  """Every class, background scripts first (see the module docstring for the rules)."""
  seen = {_shape_key(_render(0, str(d))) for d in range(10)}  # digit shapes are never classes
  out = []
  for script, ranges in SCRIPTS:
    for start, end in ranges:
      for code_point in range(start, end + 1):
        if not _is_candidate(code_point, script) or not _has_glyph(0, code_point):
          continue
        key = _shape_key(_render(0, chr(code_point)))
        if key is None or key in seen:
          continue
        seen.add(key)
        fonts = tuple(i for i in range(len(FONTS)) if i == 0 or _has_glyph(i, code_point))
        out.append(Character(len(out), code_point, script, fonts))
  return tuple(out)


@functools.lru_cache(maxsize=4096)
def _blurred(font_index: int, code_point: int) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  return ndimage.gaussian_filter(_render(font_index, chr(code_point)), _BLUR_SIGMA)


def _distort(font_index: int, code_point: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps 1-3 up to the box: (distorted canvas float32 [96, 96], jitter matrix A, centres (x, y) of
  the canvas pixels >= half ink, about the canvas centre). Draws the elastic field, then rotation,
  shear and aspect from `rng`, in that order."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  image = _blurred(font_index, code_point)
  dx, dy = (ndimage.gaussian_filter(rng.uniform(-1, 1, image.shape), _ELASTIC_SIGMA) * _ELASTIC_ALPHA
            for _ in range(2))
  rows, cols = np.meshgrid(np.arange(_CANVAS), np.arange(_CANVAS), indexing="ij")
  image = ndimage.map_coordinates(image, [rows + dy, cols + dx], order=1).astype(np.float32)
  theta = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
  shear = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR)
  aspect = np.exp(rng.uniform(-_MAX_LOG_ASPECT, _MAX_LOG_ASPECT))
  rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  jitter = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0 / aspect])
  centres = np.argwhere(image >= 127.5)[:, ::-1] + 0.5 - _CANVAS / 2  # (x, y) about the centre
  if len(centres) == 0:  # the distortion thinned a hairline glyph away: use the undistorted one
    image = _blurred(font_index, code_point)
    centres = np.argwhere(image >= 127.5)[:, ::-1] + 0.5 - _CANVAS / 2
  return image, jitter, centres


def _to_box(image: np.ndarray, jitter: np.ndarray, low: np.ndarray, origin: np.ndarray,
            scale: np.ndarray, side: int) -> np.ndarray:
  """The jittered canvas resampled into a `side` x `side` box: jittered point `low` lands on box point
  `origin`, jittered lengths times `scale` (x, y). float32 [side, side] in 0..255."""
  # Output point p -> jittered point low + (p - origin) / scale -> canvas point by the inverse jitter
  # (PIL's AFFINE maps output coordinates to input coordinates).
  unjitter = np.linalg.inv(jitter)
  linear = unjitter / scale  # column j over scale[j]: the divisions of the 28x28 data, unchanged
  offset = unjitter @ (low - origin / scale) + _CANVAS / 2
  coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
  return np.asarray(Image.fromarray(image).transform(
      (side, side), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR), np.float32)


def render_instance(font_index: int, code_point: int, rng: np.random.Generator) -> np.ndarray:
  """One distorted rendering (steps 1-4 of the module docstring): uint8 [28, 28]."""
  image, jitter, centres = _distort(font_index, code_point, rng)
  moved = centres @ jitter.T
  low, high = moved.min(0) - 0.5, moved.max(0) + 0.5
  scale = rng.uniform(*_SIDE_RANGE) / max(high - low)
  shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, 2)
  origin = (_BOX - (high - low) * scale) / 2 + shift  # where the box corner `low` lands
  box = _to_box(image, jitter, low, origin, np.array([scale, scale]), _BOX)
  ink = box >= rng.uniform(*_THRESHOLD_RANGE) * 255.0
  small = ink.reshape(IMAGE_SIZE, 2, IMAGE_SIZE, 2).mean(axis=(1, 3))
  return np.round(small * 255.0).astype(np.uint8)


def render_optdigits_instance(font_index: int, code_point: int,
                              rng: np.random.Generator) -> np.ndarray:
  """One rendering in the format of scikit-learn's digits (the `optdigits` config): the distortion of
  steps 1-3, then optdigits' 32x32 box and 4x4 block counts. int64 [8, 8] in 0..16."""
  image, jitter, centres = _distort(font_index, code_point, rng)
  moved = centres @ jitter.T
  low, high = moved.min(0) - 0.5, moved.max(0) + 0.5
  width, height = high - low
  # printed_digits' size normalisation (measured on the handwritten digits): full height, the width
  # at the same scale but at most 20 px, centred, shifted horizontally by U(-1, 1) px.
  scale_y = _OPT_BOX / height
  scale_x = min(scale_y, _OPT_MAX_WIDTH / width)
  left = (_OPT_BOX - width * scale_x) / 2 + rng.uniform(-_OPT_MAX_SHIFT, _OPT_MAX_SHIFT)
  box = _to_box(image, jitter, low, np.array([left, 0.0]), np.array([scale_x, scale_y]), _OPT_BOX)
  ink = box >= rng.uniform(*_THRESHOLD_RANGE) * 255.0
  return ink.reshape(_OPT_SIDE, _OPT_BLOCK, _OPT_SIDE, _OPT_BLOCK).sum(axis=(1, 3))


@dataclasses.dataclass(eq=False)
class Format(tfds.core.BuilderConfig):
  """How an instance is drawn and stored: the image side, and the renderer of steps 1-4."""
  image_size: int = IMAGE_SIZE
  optdigits: bool = False  # False: render_instance (28x28); True: render_optdigits_instance (8x8)


OMNIGLOT = Format(name="omniglot", description="28x28 in 0..255 (Omniglot's usual size); the default.")
OPTDIGITS = Format(name="optdigits", description="8x8 4x4-block counts 0..16 of a 32x32 bitmap, stored "
                   "as round(x * 255 / 16), like sklearn_digits and printed_digits.",
                   image_size=_OPT_SIDE, optdigits=True)


def generate(split: str, variant: Format = OMNIGLOT) -> Iterator[dict[str, Any]]:
  """The examples of `split` ('train': background scripts, 'test': evaluation), character-major."""
  scripts = {"train": BACKGROUND, "test": EVALUATION}[split]
  chars = [c for c in characters() if c.script in scripts]
  start = time.monotonic()
  for n, char in enumerate(chars):
    rng = np.random.default_rng((_SEED, char.code_point))
    for i in range(INSTANCES):
      font = char.fonts[i % len(char.fonts)]
      _, family, bold, italic = FONTS[font]
      if variant.optdigits:  # 0..16 onto 0..255 exactly as sklearn_digits stores its pixels
        image = np.round(render_optdigits_instance(font, char.code_point, rng) * 255.0 / 16.0
                         ).astype(np.uint8)
      else:
        image = render_instance(font, char.code_point, rng)
      yield {"image": image[..., None], "label": char.label,
             "alphabet": scripts.index(char.script) + (0 if split == "train" else len(BACKGROUND)),
             "family": FAMILIES.index(family), "bold": bold, "italic": italic,
             "code_point": char.code_point}
    if (n + 1) % 200 == 0 or n + 1 == len(chars):
      logging.info("glyphs/%s %s: %d/%d characters rendered (%.0f s)", variant.name, split, n + 1,
                   len(chars), time.monotonic() - start)
  _blurred.cache_clear()


class Glyphs(tfds.core.GeneratorBasedBuilder):
  """Printed characters of 17 scripts in matplotlib's fonts, distorted like handwriting, 28x28."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 17 scripts (9 background, 8 evaluation), 20 "
                            "instances per character; configs omniglot (28x28, the "
                            "default) and optdigits (8x8 block counts)."}
  BUILDER_CONFIGS = [OMNIGLOT, OPTDIGITS]

  def _counts(self) -> tuple[int, int]:
    """(characters, background characters). Of a prepared copy, read from the files TFDS wrote in
    its data dir (the label feature's width; the train split's size over INSTANCES); before that,
    from `characters()`, which renders every candidate in every font (about 5 s: every process that
    opens the dataset would pay it)."""
    try:
      folder = epath.Path(self._data_dir)
      features = json.loads((folder / "features.json").read_text())["featuresDict"]["features"]
      splits = json.loads((folder / "dataset_info.json").read_text())["splits"]
      total = int(features["label"]["classLabel"]["numClasses"])
      train = next(sum(map(int, s["shardLengths"])) for s in splits if s["name"] == "train")
      return total, train // INSTANCES
    except (AttributeError, OSError, KeyError, ValueError, StopIteration):
      chars = characters()
      return len(chars), sum(c.script in BACKGROUND for c in chars)

  def _info(self) -> tfds.core.DatasetInfo:
    side = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description="Omniglot-style characters of 17 scripts rendered from matplotlib's fonts with "
                    "elastic, affine and stroke-width jitter; split by script.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(side, side, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=self._counts()[0]),
            "alphabet": tfds.features.ClassLabel(names=BACKGROUND + EVALUATION),
            "family": tfds.features.ClassLabel(names=FAMILIES),
            "bold": tfds.features.ClassLabel(num_classes=2),
            "italic": tfds.features.ClassLabel(num_classes=2),
            "code_point": np.int32,
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/brendenlake/omniglot",
    )

  def split_label_bound(self, split: str) -> int:
    """1 + the highest label of `split`: 'train' holds the background characters only (labels
    0..1237), so a classifier trained on it needs no output for the evaluation ones."""
    total, background = self._counts()
    return background if split == "train" else total

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download: the fonts ship inside matplotlib.
    missing = [f for f, *_ in FONTS if not os.path.exists(os.path.join(font_dir(), f))]
    if missing:
      raise RuntimeError(f"glyphs needs matplotlib's fonts {missing} in {font_dir()}; install a "
                         "matplotlib that ships them")
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, example in enumerate(generate(split, self.builder_config)):
      # A PIL image is PNG-encoded by Pillow: cheaper than TFDS's per-example TF encoder.
      yield i, {**example, "image": Image.fromarray(example["image"][..., 0])}
