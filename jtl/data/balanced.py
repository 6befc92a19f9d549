"""Class-balanced epoch orders for the in-memory pipeline (`data.per_class`): groups of examples of
one class, the groups shuffled, stateless in (seed, epoch)."""
from typing import Callable

import numpy as np
import tensorflow as tf

from jtl.errors import ConfigError


def epoch_order(targets: dict[str, np.ndarray], per_class: int,
                key: tf.Tensor) -> tuple[Callable[[tf.Tensor], tf.Tensor], int]:
  """(epoch -> the epoch's rows, int32 [length]; length): the class-balanced order of
  jtl/data/pipeline.py's docstring, as a stateless function of (key, epoch)."""
  if 'label' not in targets:
    raise ConfigError("data.per_class groups examples by their 'label', which this dataset lacks; "
                      "set --config.data.per_class=0")
  labels = targets['label'].astype(np.int64)
  _, class_of_row, counts = np.unique(labels, return_inverse=True, return_counts=True)
  groups = counts // per_class
  if not groups.sum():
    raise ConfigError(f"data.per_class={per_class} but no class has that many training examples "
                      f"(at most {counts.max()}); lower --config.data.per_class")
  # Rows sorted by class: class k's examples sit at [starts[k], starts[k] + counts[k]). Each epoch
  # keeps the first groups[k] * per_class of them, after shuffling within the class.
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  keep = np.concatenate([s + np.arange(g * per_class) for s, g in zip(starts, groups)])
  class_of_row = tf.constant(class_of_row.astype(np.int32))
  keep = tf.constant(keep.astype(np.int32))
  num_groups = int(groups.sum())

  def order(epoch: tf.Tensor) -> tf.Tensor:
    # A random permutation, then a stable sort by class: each class's rows in a random order.
    shuffled = tf.random.experimental.stateless_shuffle(
        tf.range(len(labels), dtype=tf.int32), seed=tf.stack([key, 2 * epoch]), alg='philox')
    by_class = tf.gather(shuffled, tf.argsort(tf.gather(class_of_row, shuffled), stable=True))
    grouped = tf.reshape(tf.gather(by_class, keep), [num_groups, per_class])
    group_order = tf.random.experimental.stateless_shuffle(
        tf.range(num_groups, dtype=tf.int32), seed=tf.stack([key, 2 * epoch + 1]), alg='philox')
    return tf.reshape(tf.gather(grouped, group_order), [-1])

  return order, num_groups * per_class
