"""`multi_digits`: the MultiMNIST protocol on scikit-learn's 8x8 digits, two tasks per image.

MultiMNIST (Sabour et al. 2017, as used for multitask learning by Sener & Koltun 2018): two digits on
one canvas, one in the top-left and one in the bottom-right, overlapping; task `left` classifies the
top-left digit, task `right` the bottom-right one. Sener & Koltun put 28x28 digits at (0, 0) and
(6, 6) of a 36x36 canvas (a shift of 21% of the digit) and take the pixel-wise max where they overlap.

Here, with the 8x8 digits of `sklearn_digits` (uint8 0..255, see `jtl.data.digits`):
* Canvas 12x12 (= 8 + 4: room for both digits at their largest offsets, with no resize).
* The left digit's top-left corner is at (row, col) with row, col ~ U{0, 1} (independent); the right
  digit's at (4 - row', 4 - col'), row', col' ~ U{0, 1}. The two digits are thus shifted by 2..4 px
  (25-50% of the digit) along each axis, so their 8x8 boxes overlap by 4..6 px per axis (the ink,
  ~6 columns wide in these digits, overlaps more or less heavily), as in MultiMNIST.
* Canvas = pixel-wise max of the two placed digits (zeros elsewhere).
* Pairs: the left images are a seeded shuffle of the source split repeated (each source image is the
  left digit 4-5 times), the right image is uniform over the *other* images of the same source split.
  As in Sener & Koltun, the classes are not constrained (a pair may show one class twice), so the two
  labels are close to independent.
* `train` (6,000 pairs) only uses images of `sklearn_digits`' train split (1,438 images) and `test`
  (1,500 pairs) only images of its test split (359): no test digit is ever seen in training.

Features: `image` uint8 [12, 12, 1], `left` and `right` ClassLabel(10). Deterministic (fixed seed,
numpy's PCG64), ~1 s to prepare, offline.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jtl.data import digits

CANVAS = 12
MAX_OFFSET = 1  # Each digit moves 0..MAX_OFFSET px from its corner along each axis.
SPLIT_SIZES = {"train": 6000, "test": 1500}
_SEED = 0  # Fixed forever: changing it changes the dataset, so it would need a new VERSION.


def pair_plan(split: str) -> dict[str, np.ndarray]:
  """Which source images make each pair of `split`, and where they go.

  Returns int64 arrays: `left_index`, `right_index` [N] (indices into scikit-learn's `load_digits`,
  all in `digits.split_indices()[split]`), `left_corner`, `right_corner` [N, 2] (row, col of each
  digit's top-left pixel on the canvas).
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"unknown split {split!r}; use one of {list(SPLIT_SIZES)}")
  pool = digits.split_indices()[split]
  n = SPLIT_SIZES[split]
  rng = np.random.default_rng((_SEED, list(SPLIT_SIZES).index(split)))  # One stream per split.
  repeats = -(-n // len(pool))
  left = np.concatenate([rng.permutation(len(pool)) for _ in range(repeats)])[:n]
  # A uniform draw over the other len(pool) - 1 images: never the left image itself.
  right = (left + rng.integers(1, len(pool), size=n)) % len(pool)
  far = CANVAS - 8  # The right digit's corner when it sits flush with the bottom-right.
  left_corner = rng.integers(0, MAX_OFFSET + 1, size=(n, 2))
  right_corner = far - rng.integers(0, MAX_OFFSET + 1, size=(n, 2))
  return {"left_index": pool[left], "right_index": pool[right],
          "left_corner": left_corner, "right_corner": right_corner}


def compose(left: np.ndarray, right: np.ndarray, left_corner: np.ndarray,
            right_corner: np.ndarray) -> np.ndarray:
  """Two uint8 [8, 8, 1] digits on a zero [CANVAS, CANVAS, 1] canvas, pixel-wise max where they meet."""
  canvas = np.zeros((CANVAS, CANVAS, 1), np.uint8)
  for image, (row, col) in ((left, left_corner), (right, right_corner)):
    window = canvas[row:row + 8, col:col + 8]
    np.maximum(window, image, out=window)
  return canvas


class MultiDigits(tfds.core.GeneratorBasedBuilder):
  """Two overlapping scikit-learn digits per 12x12 image; labels `left` and `right` (MultiMNIST)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 12x12 canvas, 6000/1500 pairs from disjoint sources."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="MultiMNIST-style pairs of scikit-learn's 8x8 digits on a 12x12 canvas: one "
                    "near the top-left (`left`), one near the bottom-right (`right`), pixel-wise max.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(CANVAS, CANVAS, 1), dtype=np.uint8),
            "left": tfds.features.ClassLabel(num_classes=10),
            "right": tfds.features.ClassLabel(num_classes=10),
        }),
        homepage="https://arxiv.org/abs/1810.04650",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download: the digits ship inside scikit-learn.
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    images, labels = digits._digits()  # pylint: disable=protected-access
    plan = pair_plan(split)
    for i in range(SPLIT_SIZES[split]):
      left, right = plan["left_index"][i], plan["right_index"][i]
      image = compose(images[left], images[right], plan["left_corner"][i], plan["right_corner"][i])
      # A PIL image is PNG-encoded by Pillow: ~4x cheaper than TFDS's per-example TF encoder.
      yield i, {"image": PIL.Image.fromarray(image[..., 0]), "left": int(labels[left]),
                "right": int(labels[right])}
