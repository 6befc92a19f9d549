"""Source task without digits: pretrain `cnn_small` on the 1,238 background characters of `glyphs`,
in the handwritten digits' own format (`glyphs/optdigits`: 8x8 block counts, jtl/data/glyphs.py).

  python -m experiments.train --config=experiments/configs/pretrain_glyphs.py \
      --workdir=runs/pretrain_glyphs
  python -m experiments.evaluate --workdir=runs/pretrain_glyphs

Cross-entropy over the characters of the 9 background scripts (the `train` split, 24,760 images).
No digit is a class of `glyphs` (nor any character shaped like one), so the handwritten digits that
`transfer_glyphs.py` fine-tunes on are an unseen domain *and* unseen classes. The backbone is
`params/backbone/...` as in `pretrain_digits.py`, so a run is the `init_from` of `transfer_digits.py`
(`pretrain=<this workdir>`; the 1,238-way head is not loaded).

Evaluators: kNN and the closed-form ridge probe on frozen features, fitted on 1 and on 5 labelled
handwritten digits per class of 5-9 (`shots_seed` 0) and scored on every handwritten test digit of
5-9: how far the features transfer, at every checkpoint, without a fine-tuning run. (The glyphs'
test split holds the evaluation scripts, whose characters the head has no row for.)
Figures: docs/glyphs_transfer.md.
"""
import ml_collections

from experiments.configs.common import base_config
from experiments.configs.simclr_digits import TARGET_CLASSES

NUM_BACKGROUND_CLASSES = 1238  # characters of the background scripts (tests/test_glyphs.py checks)


def handwritten_evals(shots=(1, 5), seed=0) -> ml_collections.ConfigDict:
  """kNN + ridge probe on K handwritten digits per class of 5-9 (`sklearn_digits`), for each K."""
  evals = {}
  for k in shots:
    target = dict(name="sklearn_digits", labels=TARGET_CLASSES, shots=k, shots_seed=seed)
    evals[f"knn_5to9_{k}shot"] = dict(type="knn", data=target, tag=f"5-9_{k}shot")
    evals[f"probe_5to9_{k}shot"] = dict(type="linear_probe", data=target, tag=f"5-9_{k}shot")
  return ml_collections.ConfigDict(evals)


def get_config(arg=None):
  del arg
  c = base_config()
  c.total_steps = 2000  # about 1 min at 35 steps/s; kNN on handwritten 5-9 flat from 1,500 on
  c.batch_size = 128
  c.log_every = 100
  c.checkpoint_every = 500
  c.data.name = "glyphs/optdigits"
  # The train split holds only these; the dataset's label space (1,598) also has the evaluation
  # scripts', which the head needs no row for.
  c.data.labels = tuple(range(NUM_BACKGROUND_CLASSES))
  c.data.augment = True  # the digits' random crop, as pretrain_digits.py
  c.model.num_classes = NUM_BACKGROUND_CLASSES
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.evals = handwritten_evals()
  return c
