"""`sklearn_digits`: an offline TFDS builder over the 8x8 digits that ship inside scikit-learn.

No download: `_split_generators` reads `sklearn.datasets.load_digits()` (bundled with the package), so
`download_and_prepare` works without network. The train/test split is fixed, stratified and ~80/20.
"""
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # Fixed forever: changing it changes the dataset, so it would need a new VERSION.


def _digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 8, 8, 1] in 0..255, labels int64 [N]) from scikit-learn."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top  (slow import)
  digits = load_digits()
  # Pixels are integers 0..16; map them onto 0..255 so the images look like every other TFDS image.
  images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """Deterministic stratified split: per class a fixed-seed permutation, the first 20% go to test."""
  _, labels = _digits()
  rng = np.random.default_rng(_SPLIT_SEED)
  train, test = [], []
  for label in range(10):
    idx = rng.permutation(np.flatnonzero(labels == label))
    n_test = int(round(len(idx) * _TEST_FRACTION))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return {'train': np.sort(np.concatenate(train)), 'test': np.sort(np.concatenate(test))}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """The 1,797 handwritten 8x8 digits of scikit-learn (UCI optdigits test set), built offline."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stratified 80/20 train/test split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='8x8 grayscale handwritten digits bundled with scikit-learn, scaled to 0..255.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download: the data ships inside scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    images, labels = _digits()
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
