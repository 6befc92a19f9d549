"""A user's own images as a TFDS dataset: `config.data.name = "folder:/path/to/images"`.

Layout: one sub-folder per class (its name is the class name; classes are numbered in sorted order),
images anywhere below it (sub-folders are searched). Splits come either from sub-folders `train/` and
`test/` of the root, each holding the class folders, or, without those, from a held-out share of each
class (`config.data.folder_test_fraction`, default 0.2): per class, the files ordered by the SHA-1 of
their path inside the class folder, the first max(1, round(f * n)) (at most n - 1) go to `test`. So the
split is deterministic, stratified, and adding a file to a class moves no file of the other classes
(and at most one of its own). With `train/` and `test/`, other top-level folders are ignored.

Formats: whatever Pillow reads among .png .jpg .jpeg .bmp .gif (first frame) .webp .tif .tiff (case
ignored); other files and hidden ones are skipped. EXIF orientation is applied. Every image is stored
as uint8 PNG with 1 channel if all images are grayscale, else 3 (RGB; alpha dropped).

Features: `image` with a fixed shape when every image has the same size, else (None, None, C), which
the pipeline accepts only with `data.image_size` set (it resizes to that square); and `label`, a
ClassLabel with the folder names. So caching, K-shot, augmentation, resizing and normalisation work
unchanged.

Preparation is offline, into the TFDS data dir, as builder `user_image_folder` with one config per
folder state: its name is the folder's base name plus a hash of the absolute path, the layout, the
held-out fraction and every image's relative path, size and mtime. Changing the folder (adding,
removing, editing or touching a file) therefore prepares a fresh copy; unchanged folders are reused.
A process opens each dataset once (`jtl.data.source` caches builders), so a folder changed while a
run goes on is seen by the next run.

Bad input is a one-line ConfigError naming the path: a missing or empty folder (no class folders), a
class folder without images, an image Pillow cannot read, a flat layout class with a single image, a
class in `test/` that `train/` lacks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from jtl.errors import ConfigError

NAME = "folder"  # the part of `folder:<path>` before the colon (what jtl.data.source looks at)
PREFIX = NAME + ":"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEST_FRACTION = 0.2
_FRACTION_KEY = "#test_fraction="  # appended to the name in builder keys (see `builder_key`)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_FORMAT = "jtl-folder-1"  # part of every hash: bump it when the stored pixels would change


def is_folder(name: Any) -> bool:
  """Whether a dataset name is a `folder:<path>` name."""
  return isinstance(name, str) and name.startswith(PREFIX)


def builder_key(name: str, test_fraction: float) -> str:
  """The name `jtl.data.source` opens the builder by: the dataset name and the held-out fraction."""
  return f"{name}{_FRACTION_KEY}{float(test_fraction)!r}"


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """What a folder holds: classes, files per split ((path relative to root, label)), image shape."""
  root: str
  layout: str  # "split" (train/ and test/ sub-folders) or "flat" (held-out fraction)
  classes: tuple[str, ...]
  splits: dict[str, tuple[tuple[str, int], ...]]
  shape: tuple[int | None, int | None, int]
  fingerprint: str


def _visible(entry: os.DirEntry) -> bool:
  return not entry.name.startswith(".")


def _class_folders(folder: str) -> list[str]:
  with os.scandir(folder) as entries:
    return sorted(e.name for e in entries if _visible(e) and e.is_dir())


def _images_below(folder: str) -> list[str]:
  """Image files under `folder` (recursively, sorted), as paths relative to it."""
  found = []
  for parent, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(os.path.join(parent, name), folder))
  return found


def _header(path: str) -> tuple[int, int, bool]:
  """(height, width, grayscale) from the file's header, after EXIF orientation."""
  try:
    with Image.open(path) as image:
      width, height = image.size
      if image.getexif().get(0x0112) in (5, 6, 7, 8):  # a 90-degree EXIF rotation swaps the sides
        width, height = height, width
      return height, width, image.mode in _GRAY_MODES
  except Exception as e:  # Pillow raises many types for a bad file
    raise ConfigError(f"cannot read image {path} ({type(e).__name__}: {e}); fix or remove the file"
                      ) from None


def _held_out(files: list[str], fraction: float) -> set[str]:
  """The deterministic test share of one class's files (paths relative to the class folder)."""
  n_test = min(len(files) - 1, max(1, round(fraction * len(files))))
  ranked = sorted(files, key=lambda f: hashlib.sha1(f.encode()).hexdigest())
  return set(ranked[:n_test])


def scan(root: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> FolderScan:
  """Lists and checks a folder (file headers only); ConfigError naming the path on bad input."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise ConfigError(f"image folder {root} does not exist or is not a folder; set "
                      "--config.data.name=folder:/path/to/images")
  top = _class_folders(root)
  layout = "split" if {"train", "test"} <= set(top) else "flat"
  parts = {"train": "train", "test": "test"} if layout == "split" else {"": ""}
  per_part = {part: _class_folders(os.path.join(root, part)) for part in parts}
  classes = sorted(set().union(*per_part.values()))
  if not classes:
    raise ConfigError(f"image folder {root} holds no class folders; put each class's images in a "
                      "sub-folder named after the class (e.g. cat/1.png, dog/2.png)")
  if layout == "split":
    for name in sorted(set(per_part["test"]) - set(per_part["train"])):
      raise ConfigError(f"class folder {os.path.join(root, 'test', name)} has no counterpart in "
                        f"{os.path.join(root, 'train')}; add its training images or remove it")
  splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
  stats, shapes, gray = [], set(), []
  for part, names in per_part.items():
    for name in names:
      folder = os.path.join(root, part, name)
      files = _images_below(folder)
      if not files:
        raise ConfigError(f"class folder {folder} holds no images ({', '.join(EXTENSIONS)}); add "
                          "some or remove the folder")
      if layout == "flat" and len(files) < 2:
        raise ConfigError(f"class folder {folder} holds 1 image; a held-out test split needs at "
                          "least 2 per class (add images, or use train/ and test/ sub-folders)")
      test = _held_out(files, test_fraction) if layout == "flat" else set()
      for file in files:
        rel = os.path.join(part, name, file)
        split = part if layout == "split" else ("test" if file in test else "train")
        splits[split].append((rel, classes.index(name)))
        path = os.path.join(root, rel)
        stat = os.stat(path)
        stats.append((rel, stat.st_size, stat.st_mtime_ns))
        height, width, is_gray = _header(path)
        shapes.add((height, width))
        gray.append(is_gray)
  channels = 1 if all(gray) else 3
  shape = (*next(iter(shapes)), channels) if len(shapes) == 1 else (None, None, channels)
  identity = [_FORMAT, root, layout, test_fraction if layout == "flat" else None, stats]
  fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
  return FolderScan(root, layout, tuple(classes), {k: tuple(v) for k, v in splits.items()}, shape,
                    fingerprint)


def load_image(path: str, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] (EXIF orientation applied); ConfigError naming the file if unreadable."""
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      array = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
  except Exception as e:  # a header that reads but a body that does not (truncated files)
    raise ConfigError(f"cannot read image {path} ({type(e).__name__}: {e}); fix or remove the file"
                      ) from None
  return array.reshape(array.shape[0], array.shape[1], channels)


class _DropMessage(logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefix)


class UserImageFolder(tfds.core.GeneratorBasedBuilder):
  """One folder of class sub-folders, prepared offline; the config name identifies the folder state."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "A user's image folder (jtl.data.folder)."}

  def __init__(self, *, folder: FolderScan, data_dir: str | None = None):
    self.folder = folder  # before the base class reads `_info`
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(folder.root).lower()).strip("_")[:32]
    config = tfds.core.BuilderConfig(name=f"{slug or 'root'}_{folder.fingerprint[:16]}",
                                     description=f"images under {folder.root}")
    quiet = _DropMessage("Using custom data configuration")  # expected: one config per folder state
    logging.getLogger("absl").addFilter(quiet)
    try:
      super().__init__(config=config, data_dir=data_dir)
    finally:
      logging.getLogger("absl").removeFilter(quiet)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f"Class-folder images under {self.folder.root} ({self.folder.layout} layout).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.folder.shape, dtype=np.uint8,
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(self.folder.classes)),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
    del dl_manager  # nothing to download: the images are on disk
    return {split: self._generate_examples(files) for split, files in self.folder.splits.items()
            if files}

  def _generate_examples(self, files: tuple[tuple[str, int], ...]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    channels = self.folder.shape[2]
    for rel, label in files:
      yield rel, {"image": load_image(os.path.join(self.folder.root, rel), channels), "label": label}


def builder(key: str, data_dir: str | None = None) -> UserImageFolder:
  """The (not necessarily prepared) builder for a `folder:<path>` name or `builder_key`."""
  name, fraction = key, DEFAULT_TEST_FRACTION
  if _FRACTION_KEY in key:
    name, _, text = key.rpartition(_FRACTION_KEY)
    fraction = float(text)
  root = os.path.abspath(os.path.expanduser(name[len(PREFIX):]))
  return UserImageFolder(folder=scan(root, fraction), data_dir=data_dir)


def class_names(path: str) -> tuple[str, ...]:
  """The class names of an image folder, from its folder names alone (cheap: no file is opened); for
  configs: `num_classes = len(class_names(path))`."""
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(root):
    raise ConfigError(f"image folder {root} does not exist or is not a folder; pass path= an "
                      "existing folder of class sub-folders")
  top = _class_folders(root)
  if {"train", "test"} <= set(top):
    top = sorted(set(_class_folders(os.path.join(root, "train"))) |
                 set(_class_folders(os.path.join(root, "test"))))
  if not top:
    raise ConfigError(f"image folder {root} holds no class folders; put each class's images in a "
                      "sub-folder named after the class (e.g. cat/1.png, dog/2.png)")
  return tuple(top)
