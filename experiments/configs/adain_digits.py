"""AdaIN (Huang & Belongie 2017): a decoder trained to turn any handwritten digit into the style of any
printed one in a single forward pass, through a frozen pretrained encoder.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py \
      --workdir=/tmp/jtl/pretrain_digits
  python -m experiments.train \
      --config=experiments/configs/adain_digits.py:encoder=/tmp/jtl/pretrain_digits \
      --workdir=/tmp/jtl/adain

Arguments: encoder (a jtl run's workdir, or a weights file with --config.model.*), content (dataset
of the content images, default sklearn_digits), style (default printed_digits). Each batch pairs
batch_size / 2 content images with as many style images (data.mixture members `content` and
`style`). Options: --config.adain.{layer, style_layers, style_weight, width}
(`jtl.objectives.adain.default_config`). The encoder run's model and preprocessing (normalisation,
image size) are read from its config.json. Trains `params/decoder` alone; the encoder is frozen.
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from experiments.configs.style_transfer import DATA_KEYS, WEIGHT_FILES
from jtl import config as config_lib
from jtl.objectives import adain


def get_config(arg=None):
  a = parse_arg(arg, encoder="/tmp/jtl/pretrain_digits", content="sklearn_digits",
                style="printed_digits")
  c = base_config()
  c.objective = "adain"
  c.adain = adain.default_config()
  c.total_steps = 300
  c.batch_size = 32
  c.log_every = 25
  c.checkpoint_every = 100
  c.trainable = adain.DECODER_RULES
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.init_from.dont_load = ("params/decoder/.*",)
  encoder = str(a.encoder)
  if encoder.endswith(WEIGHT_FILES):
    c.init_from.path = encoder
  else:
    c.init_from.workdir = encoder
    run = config_lib.load_run_config(encoder)
    if run is not None and "model" in run:
      c.model = ml_collections.ConfigDict(config_lib.as_plain(run.model))
      for key in DATA_KEYS:
        if key in run.get("data", {}):
          c.data[key] = run.data[key]
  c.data.mixture = ml_collections.ConfigDict({"content": dict(name=str(a.content)),
                                              "style": dict(name=str(a.style))})
  return c
