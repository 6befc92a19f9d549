"""CLIP or SigLIP on the digits and their caption templates (jtl/text.py), judged zero-shot.

  python -m experiments.train --config=experiments/configs/clip_digits.py:loss=softmax \
      --workdir=/tmp/jtl/clip
  python -m experiments.train --config=experiments/configs/clip_digits.py:loss=sigmoid \
      --workdir=/tmp/jtl/siglip [--config.clip.chunked=True]
  python -m experiments.evaluate --workdir=/tmp/jtl/clip

Trains on all ten digits, each image paired with a caption from one of the 12 training templates
drawn per example and step; evaluates zero-shot classification and image<->text retrieval on the
test split with the 4 held-out templates (phrasings never used in training). Options: `config.clip`
(jtl/objectives/clip.py), `config.augment` (the image view, jtl/augment.py).
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from jtl import augment
from jtl.objectives import clip

LOSSES = ("softmax", "sigmoid")


def get_config(arg=None):
  a = parse_arg(arg, loss="softmax")
  if a.loss not in LOSSES:
    raise ValueError(f"unknown loss {a.loss!r}; use one of {', '.join(LOSSES)}")
  c = base_config()
  c.objective = "clip"
  c.total_steps = 600
  c.batch_size = 128
  c.log_every = 50
  c.checkpoint_every = 200
  c.data.augment = False  # the image view comes from config.augment, on device
  c.model.num_classes = 10  # unused by clip (its backbone has no head); kept for init_from users
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.clip = clip.default_config()
  c.clip.loss = a.loss
  c.augment = augment.default_config()
  c.evals = ml_collections.ConfigDict(dict(
      zero_shot=dict(type="zero_shot"),
      retrieval=dict(type="retrieval"),
      knn=dict(type="knn"),
  ))
  return c
