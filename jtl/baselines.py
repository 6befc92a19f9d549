"""Raw-pixel baselines for few-shot transfer: what a run must beat to show that transfer helped.

  from jtl import baselines
  baselines.pixel_baselines(config.data)  # {'pixels_logreg': 0.72, 'pixels_1nn': 0.72}

Both read the data through the project's own pipeline (`jtl.data.eval_iterator`), so they see exactly
what a transfer run with the same `config.data` sees: the same K labelled examples per class
(`labels`, `shots`, `shots_seed` select them in `jtl.data.source.selected_indices`), the same test
split, and the same pixels (`image_size`, `normalize`), without the training-time crop augmentation.

  pixels_logreg  scikit-learn LogisticRegression (L2, C=1) on the flattened pixels;
  pixels_1nn     1-nearest-neighbour on the flattened pixels (Euclidean; ties go to the first).
"""
from __future__ import annotations

import ml_collections
import numpy as np

NAMES = ("pixels_logreg", "pixels_1nn")


def examples(data_config: ml_collections.ConfigDict, split: str | None = None,
             batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(flattened float32 pixels [N, D], int labels [N]) of `split` (default: the eval split), as the
  pipeline's eval iterator yields them: the label filter applied, K-shot selection on the train
  split, normalised, not augmented. Padding rows (mask 0) are dropped."""
  from jtl.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow: not for NAMES)
  make, _ = pipeline.eval_iterator(data_config, split=split, global_batch_size=batch_size)
  images, labels = [], []
  for batch in make():
    keep = batch["mask"] > 0
    images.append(batch["image"][keep].reshape(int(keep.sum()), -1))
    labels.append(batch["label"][keep])
  return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int64)


def nearest_neighbour(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """1-NN labels of the rows of `x` among (`train_x`, `train_y`), by Euclidean distance."""
  distances = ((x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
  return train_y[np.argmin(distances, axis=1)]


def logistic_regression(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray,
                        c: float = 1.0) -> np.ndarray:
  """Multinomial L2 logistic regression (scikit-learn, C=`c`) fitted on the train rows; labels of `x`."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top (slow)
  model = LogisticRegression(C=c, max_iter=5000)
  return model.fit(train_x, train_y).predict(x)


def pixel_baselines(data_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Test accuracy of `pixels_logreg` and `pixels_1nn`, fitted on the labelled train examples that
  `data_config` selects and scored on its eval split."""
  from jtl.data import source  # pylint: disable=g-import-not-at-top
  c = source.validate(data_config)
  train_x, train_y = examples(c, c.train_split)
  test_x, test_y = examples(c, c.eval_split)
  return {"pixels_logreg": float(np.mean(logistic_regression(train_x, train_y, test_x) == test_y)),
          "pixels_1nn": float(np.mean(nearest_neighbour(train_x, train_y, test_x) == test_y))}
