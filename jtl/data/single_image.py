"""One image, by name: an example of an embedded/TFDS dataset (`DATASET@INDEX`) or an image file,
preprocessed exactly as a data config preprocesses its batches (what style transfer's content and style
images are).

Spec forms:
  `sklearn_digits@12`        example 12 of the dataset's train split (`data.train_split`), in the
                             order the pipeline reads it (no label filter, no shots); any TFDS name
                             the pipeline accepts, e.g. `printed_digits@5` or `printed_digits/elastic@0`.
  `path/to/picture.png`      an image file (anything Pillow opens), converted to the data's channels
                             (grey `L` for 1, `RGB` for 3) and resized to the data's height and width.
Both then go through the data config's normalisation: x / 255, then (x - mean) / std if
`data.normalize` is a (mean, std) pair.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from jtl.data import config as data_config_lib
from jtl.data import pipeline, source
from jtl.errors import ConfigError


def _normalize(images_uint8: np.ndarray, normalize: Any) -> np.ndarray:
  """The pipeline's `preprocess.normalizer`, in NumPy."""
  x = images_uint8.astype(np.float32) / 255.0
  pair = data_config_lib.parse_normalize(normalize)
  if pair is not None:
    mean, std = (np.asarray(v, np.float32) for v in pair)
    x = (x - mean) / std
  return x


def denormalize(images: np.ndarray, normalize: Any) -> np.ndarray:
  """Inverse of the normalisation, clipped to [0, 1] for display."""
  x = np.asarray(images, np.float32)
  pair = data_config_lib.parse_normalize(normalize)
  if pair is not None:
    mean, std = (np.asarray(v, np.float32) for v in pair)
    x = x * std + mean
  return np.clip(x, 0.0, 1.0)


def _dataset_example(spec: str, data_config: ml_collections.ConfigDict
                     ) -> tuple[np.ndarray, str]:
  name, _, index_text = spec.rpartition("@")
  try:
    index = int(index_text)
  except ValueError:
    index = -1
  if index < 0:
    raise ConfigError(f"image {spec!r}: the index after '@' must be an integer >= 0, e.g. "
                      f"{name or 'sklearn_digits'}@0")
  c = ml_collections.ConfigDict(data_config_lib.default_data_config().to_dict())
  for key in ("data_dir", "normalize", "image_size", "train_split"):
    c[key] = data_config.get(key, c[key])
  c.name = name
  c = source.validate(c)
  images, targets = pipeline.load_in_memory(c, c.train_split)
  if index >= len(images):
    raise ConfigError(f"image {spec!r}: {name} {c.train_split} has {len(images)} examples; pick an "
                      f"index below {len(images)}")
  label = targets.get("label")
  caption = f"{name}@{index}" + (f" (label {int(label[index])})" if label is not None else "")
  return images[index], caption


def _file_image(path: str, height: int, width: int, channels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only for files)
  if channels not in (1, 3):
    raise ConfigError(f"image file {path}: the encoder reads {channels}-channel images; only 1 (grey)"
                      " and 3 (RGB) can be made from a file")
  try:
    with Image.open(path) as im:
      im = im.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
      pixels = np.asarray(im, np.uint8)
  except OSError as e:
    raise ConfigError(f"cannot read image file {path} ({e}); give a PNG/JPEG path or DATASET@INDEX"
                      ) from e
  return pixels.reshape(height, width, channels)


def load(spec: str, data_config: ml_collections.ConfigDict, shape: tuple[int, int, int]
         ) -> tuple[np.ndarray, str]:
  """(float32 `[H, W, C]` image normalised as `data_config`'s batches, a caption) for `spec`.

  `shape` is the (H, W, C) the model reads; a dataset example must already have it (set
  `data.image_size` alike), a file is converted to it.
  """
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f"image spec {spec!r} is empty; give DATASET@INDEX (e.g. sklearn_digits@0) or "
                      "an image file path")
  if "@" in spec and not os.path.exists(spec):
    pixels, caption = _dataset_example(spec, data_config)
  elif os.path.isfile(spec):
    pixels, caption = _file_image(spec, *shape), os.path.basename(spec)
  else:
    raise ConfigError(f"image {spec!r} is neither DATASET@INDEX (e.g. sklearn_digits@0) nor an "
                      "existing image file; fix the path")
  if tuple(pixels.shape) != tuple(shape):
    raise ConfigError(f"image {spec!r} is {tuple(pixels.shape)} but the encoder reads {tuple(shape)}"
                      "; use a dataset of that size, or set --config.data.image_size")
  return _normalize(pixels, data_config.get("normalize", "unit")), caption
