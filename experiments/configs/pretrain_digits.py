"""Source task: pretrain a small CNN on digits 0–4 of the embedded (offline) sklearn digits.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=/tmp/jtl/pretrain
  python -m experiments.evaluate --config=experiments/configs/pretrain_digits.py --workdir=/tmp/jtl/pretrain

Argument `evals=table`: the contrastive table's kNN and ridge probes on the frozen encoder instead of
the test metrics (simclr_digits.py `table_evals`; its sweep `table` trains this as the supervised
encoder).
"""
from experiments.configs import simclr_digits
from experiments.configs.common import base_config, parse_arg

SOURCE_CLASSES = (0, 1, 2, 3, 4)


def get_config(arg=None):
  a = parse_arg(arg, evals="default")
  if a.evals not in ("default", "table"):
    raise ValueError(f"unknown evals {a.evals!r}; use default or table")
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
  if a.evals == "table":
    c.evals = simclr_digits.table_evals()
  return c
