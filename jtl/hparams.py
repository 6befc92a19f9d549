"""A run's hyper-parameters for TensorBoard's HParams tab, so the cells of a sweep can be compared.

`write(workdir, config)` writes the flattened config (`optim.lr`, `model.name`, `seed`, ...) as the
HParams plugin's session-start record into `WORKDIR/tensorboard/` itself. The metrics that
`MetricWriter` writes below it (`tensorboard/train_metrics`, `tensorboard/eval_metrics`) are then this
session's metric groups: the plugin lists every scalar tag found there and shows its last value, so
the final train and eval metrics are the HParams metrics without being written twice.

    tensorboard --logdir=ROOT      # ROOT holds the runs (a sweep's cells): the HParams tab has a row
                                   # per run, a column per config key and per metric

No experiment-wide summary (`hparams_config`) is written: each run knows only its own values, and
without one the plugin builds the columns from all the runs it finds. A resumed run writes its
record again (the same values; the plugin keeps one per run).
"""
from __future__ import annotations

import json
import jax
import ml_collections
from etils import epath

from jtl import config as config_lib

SUBDIR = "tensorboard"


def flat_values(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
  """The config as `{dotted.key: value}` with the value types the plugin accepts: bools, numbers and
  strings as they are; None, lists and tuples (mesh rules, stage sizes) as their JSON text. An empty
  section is left out."""
  out = {}
  for key, value in config_lib.flatten(config_lib.as_plain(config)).items():
    if value == {}:
      continue
    # (None as "null" text, not left out: a sweep's cells may set a key that others leave None)
    out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
  return out


def write(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
  """Writes `config`'s values as the HParams session of the run in `workdir` (process 0 only)."""
  if jax.process_index() != 0:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (loaded already for tf.data)
  # summary_v2, not the plugin's `api` module: that one also imports its Keras callback, and with it
  # all of Keras (1.5 s of every run's start-up; jtl never uses Keras).
  from tensorboard.plugins.hparams import summary_v2 as hp  # pylint: disable=g-import-not-at-top
  writer = tf.summary.create_file_writer(str(epath.Path(workdir) / SUBDIR))
  try:
    with writer.as_default():
      hp.hparams(flat_values(config))
  finally:
    writer.close()

