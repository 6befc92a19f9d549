"""Input pipelines: TFDS datasets (and embedded offline builders) -> host-local NumPy batches.

Importing this package hides accelerators from TensorFlow, so tf.data never takes GPU/TPU memory
that JAX needs.
"""
import tensorflow as tf

for _kind in ('GPU', 'TPU'):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):  # TF already initialised its devices, or knows no such kind.
    pass

# pylint: disable=g-import-not-at-top,wrong-import-position
from jtl.data.config import default_data_config
from jtl.data.mixture import members as mixture_members
from jtl.data.mixture import train_iterator
from jtl.data.mixture import validate
from jtl.data.pipeline import eval_iterator
from jtl.data.source import get_builder
from jtl.data.source import num_classes
from jtl.data.source import num_examples

__all__ = [
    'default_data_config', 'eval_iterator', 'get_builder', 'mixture_members', 'num_classes',
    'num_examples', 'train_iterator', 'validate',
]
