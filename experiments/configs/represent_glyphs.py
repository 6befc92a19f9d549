"""Representations learned on the background scripts of `glyphs`, judged on the evaluation scripts.

  python -m experiments.train --config=experiments/configs/represent_glyphs.py:method=supcon \
      --workdir=runs/supcon_g
  python -m experiments.evaluate --workdir=runs/supcon_g

`views` (contrastive methods): `glyphs` (the default) makes the two views differ the way the glyphs'
own instances do: a rotation of up to 15 degrees, an elastic distortion of about 1 pixel (Simard et al.
2003; `augment.elastic_*`), a random resized crop of 70-100% of the area, brightness and contrast
jitter; `digits` is the digits' recipe (`augment.default_config()`: crop of 40-100%, brightness and
contrast), which leaves the views too alike (docs/glyphs.md).

`per_class`: class-balanced batches (`data.per_class`: every 4 consecutive images one character, a
batch of 128 then holds 32 characters), the default for `supcon`; `per_class=0` gives random batches,
in which SupCon's only positive is mostly the other view (docs/glyphs.md compares the two).

`method`: `supervised` (cross-entropy over the 1,238 background characters, then the head is dropped),
`simclr` (NT-Xent between two augmented views, no labels) or `supcon` (supervised contrastive, the
character as the label). All three train the same encoder as `protonet_glyphs.py` (the four-block
ConvNet, `params/backbone/...`) for the same number of images, and are scored the same way: nearest
prototypes on frozen features in 600 fixed episodes of the evaluation scripts, 5- and 20-way, 1 and 5
shots, with nearest prototypes on raw pixels beside each (the `episodic` evaluator). At one shot a
nearest prototype is a 1-nearest-neighbour classifier.
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from experiments.configs.protonet_glyphs import glyph_episodic_evals
from jtl import augment
from jtl.objectives import contrastive

NUM_BACKGROUND_CLASSES = 1238  # characters of the background scripts (tests/test_glyphs.py checks)
METHODS = ("supervised", "simclr", "supcon")
VIEWS = ("glyphs", "digits")


def glyph_views() -> ml_collections.ConfigDict:
  """`config.augment` for glyphs: the geometric variation of handwriting, then a mild crop."""
  c = augment.default_config()
  c.rotate_prob, c.rotate_degrees = 1.0, 15.0
  c.elastic_prob, c.elastic_alpha, c.elastic_sigma = 1.0, 20.0, 3.0
  c.crop_scale = (0.7, 1.0)  # a glyph fills most of its box: a 40% crop cuts strokes off
  return c


def get_config(arg=None):
  a = parse_arg(arg, method="supcon", views="glyphs", per_class=None)
  if a.method not in METHODS:
    raise ValueError(f"unknown method {a.method!r}; use one of {', '.join(METHODS)}")
  if a.views not in VIEWS:
    raise ValueError(f"unknown views {a.views!r}; use one of {', '.join(VIEWS)}")
  c = base_config()
  c.objective = a.method
  c.total_steps = 1000
  c.batch_size = 128
  c.log_every = 100
  c.checkpoint_every = 500
  c.data.name = "glyphs"
  c.data.eval_split = "test"
  c.model.widths = (64, 64, 64, 64)
  c.model.num_classes = NUM_BACKGROUND_CLASSES  # the supervised head; for contrastive, the online probe
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  if a.method != "supervised":
    c.data.augment = False  # the views come from config.augment, on device
    c.contrastive = contrastive.default_config()
    c.contrastive.temperature = 0.1
    c.augment = glyph_views() if a.views == "glyphs" else augment.default_config()
  # SupCon's positives are the other images of the anchor's character: with 1,238 characters a random
  # batch of 128 rarely holds two, so SupCon draws class-balanced batches (32 characters x 4 images).
  c.data.per_class = (4 if a.method == "supcon" else 0) if a.per_class is None else int(a.per_class)
  c.evals = glyph_episodic_evals()
  return c
