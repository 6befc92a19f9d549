"""Neural style transfer (Gatys et al. 2016): a handwritten digit redrawn in the style of a printed one.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py \
      --workdir=/tmp/jtl/pretrain_digits
  python -m experiments.train \
      --config=experiments/configs/style_transfer.py:encoder=/tmp/jtl/pretrain_digits \
      --workdir=/tmp/jtl/style
  # -> /tmp/jtl/style/plots/style_transfer.png (content, style, the image at every checkpoint);
  #    content_loss and style_loss in /tmp/jtl/style/train_metrics.jsonl
  # The picture in docs/style_transfer.md: an encoder pretrained at 32x32
  # (--config.data.image_size=32 on the first command) and --config.style.style_weight=1e4.

Arguments (all optional):
  content   the content image: DATASET@INDEX (example INDEX of DATASET's train split, e.g.
            sklearn_digits@0, printed_digits@5) or an image file (PNG/JPEG; converted to the encoder's
            channels and size). Default sklearn_digits@0 (a handwritten 0).
  style     the style image, the same forms. Default printed_digits@5 (a printed 6; the picture's
            captions give each example's label).
  encoder   the frozen feature extractor: a jtl run's workdir (default /tmp/jtl/pretrain_digits, which
            the first command above makes), a weights file (.npz/.pt/.pth/.safetensors; set its
            architecture with --config.model.*), or `random` for an untrained encoder (a warning is
            logged: random conv features still carry some texture, but a trained encoder is what the
            method assumes). A run that does not exist is an error naming the pretraining command.
  init      content (default) or noise: the starting image.
The encoder run's model and its data preprocessing (dataset, normalisation, image size) are read from
its config.json, so the images are fed to the encoder as it was trained. Options: --config.style.*
(layers, weights, tv_weight: `jtl.objectives.style.default_config`), --config.optim.lr,
--config.total_steps. The trained parameter is the image alone (`params/image`); the encoder is frozen
by the mask. Re-running the command resumes from the newest checkpoint (the image is checkpointed).
"""
import ml_collections

from experiments.configs.common import WEIGHT_FILES, base_config, parse_arg
from jtl import config as config_lib
from jtl.objectives import style

# The encoder run's preprocessing: the images must reach the encoder as its training data did.
DATA_KEYS = ("name", "data_dir", "normalize", "image_size")


def get_config(arg=None):
  a = parse_arg(arg, content="sklearn_digits@0", style="printed_digits@5",
                encoder="/tmp/jtl/pretrain_digits", init="content")
  c = base_config()
  c.objective = "style"
  c.style = style.default_config()
  c.style.content, c.style.style, c.style.init = str(a.content), str(a.style), a.init
  c.total_steps = 200
  c.batch_size = 8  # the trainer's batch is not read by this objective: keep it small
  c.log_every = 10
  c.checkpoint_every = 50  # every checkpoint is a column of the picture
  c.keep_checkpoints = None
  c.checkpoint_initial = True  # step 0: the starting image
  c.trainable = style.IMAGE_RULES
  c.optim.name = "adam"
  c.optim.lr = 0.05
  c.optim.schedule = "constant"
  c.init_from.dont_load = ("params/image",)  # the one leaf an encoder run does not have
  encoder = str(a.encoder)
  if encoder == "random":
    c.style.random_encoder = True
  elif encoder.endswith(WEIGHT_FILES):
    c.init_from.path = encoder
  else:
    c.init_from.workdir = encoder
    run = config_lib.load_run_config(encoder)
    if run is not None and "model" in run:  # else: the objective says how to make an encoder
      c.model = ml_collections.ConfigDict(config_lib.as_plain(run.model))
      for key in DATA_KEYS:
        if key in run.get("data", {}):
          c.data[key] = run.data[key]
  return c
