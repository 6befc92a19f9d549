"""Whether a classifier head fits the labels of its data: checked where a classifying objective is
built, so a head that cannot learn the labels stops the run with one line instead of training.

Two ways a run trains on nothing: a softmax over fewer than two classes (its loss is 0 whatever the
weights; a folder dataset with one class folder, or `model.num_classes=1`), and labels the head has
no output for (`data.labels` with more classes than `model.num_classes`: the cross-entropy of a
label id >= num_classes is computed against a one-hot vector of zeros, so those examples pull every
logit down and are never predicted).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ml_collections

from jtl import data
from jtl.data import folder
from jtl.errors import ConfigError


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def data_classes(data_config: ml_collections.ConfigDict,
                 members: Iterable[str] | None = None) -> dict[str, int]:
  """{where: number of classes} of the dataset (where = 'data') or of the chosen mixture members
  (where = 'data.mixture.<task>'); members without a ClassLabel 'label' are left out."""
  parts = data.mixture_members(data_config)
  if not parts:
    parts = {"": data_config}
  elif members is not None:
    parts = {k: v for k, v in parts.items() if k in set(members)}
  out = {}
  for task, c in parts.items():
    try:
      # The training split's classes: the head never sees the others (glyphs' evaluation scripts).
      out[f"data.mixture.{task}" if task else "data"] = data.num_classes(
          c, c.get("train_split") or data_config.train_split)
    except ConfigError:  # no ClassLabel 'label' feature: nothing to count (the objective says if
      continue  # it needs one)
  return out


def check_head_fits_labels(config: ml_collections.ConfigDict, num_classes: Any,
                           key: str = "model.num_classes",
                           members: Iterable[str] | None = None) -> None:
  """ConfigError unless the data has at least 2 classes and `num_classes` (the head's outputs, set
  by `--config.<key>`) is at least 2 and at least the data's number of classes."""
  counts = data_classes(config.data, members)
  for where, n in counts.items():
    if n < 2:
      c = config.data if where == "data" else config.data.mixture[where.rsplit(".", 1)[1]]
      name = c.get("name") or config.data.name
      if folder.is_folder(name):
        fix = (f"image folder {name[len(folder.PREFIX):]} holds a single class folder; add a "
               "sub-folder per class (at least 2)")
      else:
        fix = f"{where} selects a single class; select at least 2 with --config.{where}.labels"
      raise ConfigError(f"a classifier needs at least 2 classes: {fix}")
  if not _is_int(num_classes) or num_classes < 2:
    wanted = max(counts.values(), default=None)
    hint = f"={wanted} (the data's classes)" if wanted else " to the number of classes"
    raise ConfigError(f"{key}={num_classes!r}: a classifier needs at least 2 classes (a softmax over "
                      f"fewer has loss 0 and learns nothing); set --config.{key}{hint}")
  for where, n in counts.items():
    if n > num_classes:
      raise ConfigError(f"{where} has {n} classes but {key}={num_classes}: labels "
                        f"{num_classes}..{n - 1} have no output; set --config.{key}={n}, or keep "
                        f"{num_classes} classes with --config.{where}.labels")
