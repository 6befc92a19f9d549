"""`digit_attributes`: scikit-learn's 8x8 digits with several labels per example, for multitask work.

The images and the train/test split are exactly those of `sklearn_digits` (`jtl.data.digits`: 1,438
train / 359 test, stratified, fixed seed). Per example:
* `label`: ClassLabel(10), the digit.
* `parity`: ClassLabel(2), 1 = odd (1, 3, 5, 7, 9).
* `ge5`: ClassLabel(2), 1 = digit >= 5.
* `segments`: int32 [7] of 0/1, the segments a..g of a seven-segment display lit to show the digit, in
  the standard layout: a top, b upper right, c lower right, d bottom, e lower left, f upper left,
  g middle. Conventions where displays differ: 6 with its top bar a (a,c,d,e,f,g), 7 without f (a,b,c),
  9 with its bottom bar d (a,b,c,d,f,g). The table (`SEGMENTS`):
      digit  a b c d e f g       digit  a b c d e f g
        0    1 1 1 1 1 1 0         5    1 0 1 1 0 1 1
        1    0 1 1 0 0 0 0         6    1 0 1 1 1 1 1
        2    1 1 0 1 1 0 1         7    1 1 1 0 0 0 0
        3    1 1 1 1 0 0 1         8    1 1 1 1 1 1 1
        4    0 1 1 0 0 1 1         9    1 1 1 1 0 1 1
  Like `parity` and `ge5` it is a function of the class (a multi-label target whose labels share
  structure: e.g. `e` is lit exactly for 0, 2, 6, 8), not something measured on the image.
* `ink`: float32 scalar in [0, 1], the image's mean intensity (mean of the uint8 pixels / 255): a
  per-image regression target, not a function of the class.
No row-extent target: every one of the 1,797 images has ink in all 8 rows (the optdigits bitmaps were
size-normalised to the full height), so such a target would be a constant.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jtl.data import digits

SEGMENT_NAMES = ("a", "b", "c", "d", "e", "f", "g")
# Which segments each digit lights, in SEGMENT_NAMES order (see the module docstring for conventions).
SEGMENTS = np.array([
    [1, 1, 1, 1, 1, 1, 0],  # 0
    [0, 1, 1, 0, 0, 0, 0],  # 1
    [1, 1, 0, 1, 1, 0, 1],  # 2
    [1, 1, 1, 1, 0, 0, 1],  # 3
    [0, 1, 1, 0, 0, 1, 1],  # 4
    [1, 0, 1, 1, 0, 1, 1],  # 5
    [1, 0, 1, 1, 1, 1, 1],  # 6
    [1, 1, 1, 0, 0, 0, 0],  # 7
    [1, 1, 1, 1, 1, 1, 1],  # 8
    [1, 1, 1, 1, 0, 1, 1],  # 9
], dtype=np.int32)


def attributes(image: np.ndarray, label: int) -> dict[str, Any]:
  """All features of one example from its uint8 image and digit."""
  return {
      "image": image,
      "label": int(label),
      "parity": int(label) % 2,
      "ge5": int(label >= 5),
      "segments": SEGMENTS[label],
      "ink": np.float32(image.mean(dtype=np.float64) / 255.0),
  }


class DigitAttributes(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits with label, parity, >=5, seven-segment and ink targets."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: label, parity, ge5, segments, ink."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="scikit-learn's 8x8 digits (the sklearn_digits split) with several targets: "
                    "label, parity, ge5, seven-segment display segments a-g, mean ink.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "parity": tfds.features.ClassLabel(names=["even", "odd"]),
            "ge5": tfds.features.ClassLabel(names=["lt5", "ge5"]),
            "segments": tfds.features.Tensor(shape=(7,), dtype=np.int32),
            "ink": tfds.features.Scalar(dtype=np.float32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://en.wikipedia.org/wiki/Seven-segment_display",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download: the digits ship inside scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in digits.split_indices().items()}

  def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    images, labels = digits._digits()  # pylint: disable=protected-access
    for i in indices:
      example = attributes(images[i], int(labels[i]))
      # A PIL image is PNG-encoded by Pillow: ~4x cheaper than TFDS's per-example TF encoder.
      example["image"] = PIL.Image.fromarray(images[i][..., 0])
      yield int(i), example
