"""Raw-pixel baselines for few-shot transfer: what a run must beat to show that transfer helped.

  from jtl import baselines
  baselines.pixel_baselines(config.data)  # {'pixels_logreg': 0.72, 'pixels_1nn': 0.72}

Both read the data through the project's own pipeline (`jtl.data.eval_iterator`), so they see exactly
what a transfer run with the same `config.data` sees: the same K labelled examples per class
(`labels`, `shots`, `shots_seed` select them in `jtl.data.source.selected_indices`), the same test
split, and the same pixels (`image_size`, `normalize`), without the training-time crop augmentation.

  pixels_logreg  scikit-learn LogisticRegression (L2, C=1) on the flattened pixels;
  pixels_1nn     1-nearest-neighbour on the flattened pixels (Euclidean; ties go to the first);
  majority       the most frequent training label (ties: the smallest), whatever the image.

`feature` picks the target: `label` by default, or another numeric feature of the dataset (a
multitask run's task, e.g. glyphs' `alphabet`). A feature of `data.label_fraction` is fitted on the
training examples that keep its label (jtl/data/labelled.py), as a run with that config trains.
"""
from __future__ import annotations

import ml_collections
import numpy as np

NAMES = ("pixels_logreg", "pixels_1nn", "majority")
PIXELS = NAMES[:2]
_NN_BLOCK = 1 << 22  # distances in one block (rows of x at a time x train rows)
_NN_SLACK = 1e-4, 1e-9  # candidates: within 1e-4 x the nearest + 1e-9 x the squared norms of it


def examples(data_config: ml_collections.ConfigDict, split: str | None = None,
             batch_size: int = 256, feature: str = "label") -> tuple[np.ndarray, np.ndarray]:
  """(flattened float32 pixels [N, D], int targets [N]: `feature`) of `split` (default: the eval
  split), as the pipeline's eval iterator yields them: the label filter applied, K-shot selection on
  the train split, normalised, not augmented. Padding rows (mask 0) are dropped."""
  images, targets = _examples(data_config, split, batch_size, (feature,))
  return images, targets[feature]


def _examples(data_config: ml_collections.ConfigDict, split: str | None, batch_size: int,
              features: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  from jtl.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow: not for NAMES)
  make, _ = pipeline.eval_iterator(data_config, split=split, global_batch_size=batch_size)
  images, targets = [], {f: [] for f in features}
  for batch in make():
    keep = batch["mask"] > 0
    images.append(batch["image"][keep].reshape(int(keep.sum()), -1))
    for f in features:
      targets[f].append(batch[f][keep])
  return (np.concatenate(images).astype(np.float32),
          {f: np.concatenate(v).astype(np.int64) for f, v in targets.items()})


def nearest_neighbour(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """1-NN labels of the rows of `x` among (`train_x`, `train_y`), by Euclidean distance."""
  return train_y[nearest_rows(train_x, x)]


def nearest_rows(train_x: np.ndarray, x: np.ndarray) -> np.ndarray:
  """For each row of `x`, the index of its nearest row of `train_x` (Euclidean; ties: the first),
  exactly as the differences themselves give it, a block of rows of `x` at a time.

  The distances are computed as |x|^2 - 2 x.t + |t|^2 in float64, one matrix product per block, 25x
  faster than the differences. That form rounds where the differences do not (exact ties fall
  apart), so every train row within a bound of the smallest (`_NN_SLACK`: far above either form's
  rounding) is a candidate, and a row with several is settled by the differences, in `x`'s dtype."""
  t, q = train_x.astype(np.float64), x.astype(np.float64)
  t_sq = (t * t).sum(-1)
  relative, absolute = _NN_SLACK
  rows = max(1, _NN_BLOCK // max(1, len(t)))
  out = []
  for start in range(0, len(q), rows):
    block = q[start:start + rows]
    b_sq = (block * block).sum(-1, keepdims=True)
    d = b_sq - 2 * block @ t.T + t_sq
    nearest = d.min(-1, keepdims=True)
    near = d <= nearest + relative * np.abs(nearest) + absolute * (b_sq + t_sq.max())
    pick = near.argmax(-1)
    for r in np.flatnonzero(near.sum(-1) > 1):
      candidates = np.flatnonzero(near[r])
      pick[r] = candidates[np.argmin(((x[start + r] - train_x[candidates]) ** 2).sum(-1))]
    out.append(pick)
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def majority(train_y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """The most frequent of `train_y` (ties: the smallest) for every row of `x`."""
  values, counts = np.unique(train_y, return_counts=True)
  return np.full(len(x), values[np.argmax(counts)])


def logistic_regression(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray,
                        c: float = 1.0) -> np.ndarray:
  """Multinomial L2 logistic regression (scikit-learn, C=`c`) fitted on the train rows; labels of `x`."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top (slow)
  model = LogisticRegression(C=c, max_iter=5000)
  return model.fit(train_x, train_y).predict(x)


def scores(data_config: ml_collections.ConfigDict, names: tuple[str, ...] = PIXELS,
           features: tuple[str, ...] = ("label",)) -> dict[str, dict[str, float]]:
  """{feature: {name: test accuracy}} of each baseline in `names` on each target in `features`,
  fitted on the labelled train examples that `data_config` selects and scored on its eval split.
  The images are read once, and the nearest neighbours found once, for every feature."""
  from jtl.data import labelled, source  # pylint: disable=g-import-not-at-top
  c = source.validate(data_config)
  train_x, train_t = _examples(c, c.train_split, 256, features)
  test_x, test_t = _examples(c, c.eval_split, 256, features)
  nearest = {}  # {labelled rows: nearest of them}, found once per set of rows

  def nn(rows):
    if rows not in nearest:
      nearest[rows] = nearest_rows(train_x[list(rows)] if rows else train_x, test_x)
    return nearest[rows]
  out = {}
  for f in features:
    x, y, rows = train_x, train_t[f], ()
    if f in c.label_fraction:  # scarce labels: fitted on the examples that keep them, as training is
      rows = tuple(np.flatnonzero(labelled.keep_mask(y, c.label_fraction[f], c.shots_seed, f)))
      x, y = train_x[list(rows)], y[list(rows)]
    predict = {"pixels_logreg": lambda: logistic_regression(x, y, test_x),
               "pixels_1nn": lambda: y[nn(rows)],
               "majority": lambda: majority(y, test_x)}
    out[f] = {name: float(np.mean(predict[name]() == test_t[f])) for name in names}
  return out


def pixel_baselines(data_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Test accuracy of `pixels_logreg` and `pixels_1nn` on the labels (`scores` with its defaults)."""
  return scores(data_config)["label"]
