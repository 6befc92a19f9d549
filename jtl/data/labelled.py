"""Scarce labels: which training examples keep a feature's label (`data.label_fraction`).

`data.label_fraction = {feature: p}` keeps `feature` on round(p * n_c) of the n_c training examples
of each of its classes c (at least one), and sets it to `MISSING` (-1) on the others: a task with few
labels beside tasks labelled on every image, the setting where sharing a representation is expected
to help. Which examples keep it is a fixed draw, seeded by (data.shots_seed, the feature's name), over
the filtered split in memory (after `labels` and `shots`), so it does not depend on the training seed,
the batch size or the number of hosts. Only the training batches lose labels: evaluation splits, and
the train split read for evaluation, keep them all.
"""
import zlib

import numpy as np

MISSING = -1


def keep_mask(values: np.ndarray, fraction: float, seed: int, feature: str) -> np.ndarray:
  """bool [M]: the examples whose `feature` (class ids `values`) stays labelled."""
  rng = np.random.default_rng([seed, zlib.crc32(feature.encode())])
  draw = rng.random(len(values))
  keep = np.zeros(len(values), bool)
  for c in np.unique(values):
    rows = np.flatnonzero(values == c)
    k = max(1, int(round(fraction * len(rows))))
    keep[rows[np.argsort(draw[rows], kind='stable')[:k]]] = True
  return keep


def hide(targets: dict[str, np.ndarray], label_fraction: dict[str, float],
         seed: int) -> dict[str, np.ndarray]:
  """`targets` with each feature of `label_fraction` set to MISSING outside its kept examples."""
  out = dict(targets)
  for feature, fraction in label_fraction.items():
    values = targets[feature]
    out[feature] = np.where(keep_mask(values, float(fraction), seed, feature), values,
                            MISSING).astype(values.dtype)
  return out


def hidden_features(data_config) -> set[str]:
  """Features that `data.label_fraction` (or a mixture member's) leaves unlabelled on some rows."""
  if not data_config:
    return set()
  members = [data_config, *(dict(m) for m in (data_config.get('mixture') or {}).values())]
  return {f for m in members for f in (m.get('label_fraction') or {})}
