"""Source task: pretrain a small CNN on digits 0–4 of the embedded (offline) sklearn digits.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=/tmp/jtl/pretrain
  python -m experiments.evaluate --config=experiments/configs/pretrain_digits.py --workdir=/tmp/jtl/pretrain
"""
from experiments.configs.common import base_config

SOURCE_CLASSES = (0, 1, 2, 3, 4)


def get_config(arg=None):
  del arg
  c = base_config()
  c.total_steps = 400
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 100
  c.data.labels = SOURCE_CLASSES
  c.data.augment = True
  c.model.num_classes = len(SOURCE_CLASSES)
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  return c
