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

Sweep `table` (the two-tower table of docs/contrastive.md): CLIP and SigLIP, and a chance row
computed by the same evaluators on the same test split and captions (`chance=True`: a uniform guess,
a random ranking; jtl/evaluators/representation.py):

  python -m experiments.sweep --config=experiments/configs/clip_digits.py:sweep=table \
      --workdir=runs/clip_table [--parallel=2]
  python -m experiments.report --workdir=runs/clip_table
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from jtl import augment, sweep
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


CONFIG = "experiments/configs/clip_digits.py"
TABLE_METRICS = ("zero_shot_accuracy", *(f"retrieval_{d}_r{k}" for d in ("i2t", "t2i")
                                         for k in (1, 5, 10)))


def get_sweep(name):
  """`table`: CLIP (loss=softmax) and SigLIP (loss=sigmoid), seed 0, their final step; and `chance`,
  the `_chance` values the CLIP run's evaluators compute beside each metric (renamed to the
  metric)."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; clip_digits.py has: table")
  chance = {"evals.zero_shot.chance": True, "evals.retrieval.chance": True}
  cells = [sweep.Cell("clip", variant="CLIP (softmax)", config=f"{CONFIG}:loss=softmax",
                      overrides=chance),
           sweep.Cell("siglip", variant="SigLIP (sigmoid)", config=f"{CONFIG}:loss=sigmoid",
                      overrides=chance),
           sweep.Cell("chance", variant="chance (uniform guess; random ranking)", kind="view",
                      of="clip", rename={f"test/{m}_chance": f"test/{m}" for m in TABLE_METRICS})]
  # The chance row first, as a reader compares against it.
  return sweep.Sweep(name, [cells[2], *cells[:2]],
                     metrics=tuple(f"test/{m}" for m in TABLE_METRICS), title=(
      "Two towers on all ten digits: zero-shot accuracy and Recall@k on the test split "
      "with 4 held-out caption templates (relevant = same class)"))
