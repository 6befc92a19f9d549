"""Train on your own images: a folder with one sub-folder per class (jtl/data/folder.py).

  python -m experiments.train \
      --config=experiments/configs/finetune_folder.py:path=my_images,method=full \
      --workdir=runs/mine --config.data.image_size=32
  python -m experiments.evaluate --workdir=runs/mine
  # fine-tune a pretrained run (or weights file) with a method of finetune_digits.py:
  python -m experiments.train \
      --config=experiments/configs/finetune_folder.py:path=my_images,method=lora,init=runs/pre \
      --workdir=runs/mine_lora --config.data.image_size=32

Arguments: path (the image folder; relative paths are against the current directory), method (one of
finetune_digits.py's: full, linear_probe, llrd, lpft, unfreeze, lora, bitfit; default full), init (a
workdir or a weights file .npz/.pt/.pth/.safetensors; none: from scratch, which only `full` means),
image_size (the square side images are resized to; required when they differ in size), and rank,
lp_steps, unfreeze_every as in finetune_digits.py.

The number of classes is the number of class folders (read when the config loads). Splits: `train/`
and `test/` sub-folders if the folder has them, else a held-out share of each class,
`--config.data.folder_test_fraction` (default 0.2). The model is cnn_small (to use an `init`, the model
options and the image channels must match the run that wrote it: an RGB folder does not load a
grayscale digits run's first convolution). Images are scaled to [0, 1]; set
`--config.data.normalize` and `--config.data.augment=True` as you need.
"""
from __future__ import annotations

from experiments.configs import finetune_digits
from experiments.configs.common import base_config, init_from_source, parse_arg
from jtl.data import folder


def get_config(arg=None):
  a = parse_arg(arg, path="", method="full", init="", image_size=None, rank=4, lp_steps=50,
                unfreeze_every=40)
  finetune_digits.check_method(a.method)
  if not a.path:
    raise ValueError("finetune_folder.py needs path=<image folder> (one sub-folder per class)")
  if not a.init and a.method != "full":
    raise ValueError(f"method={a.method} fine-tunes pretrained weights; pass init=<workdir or "
                     "weights file>, or use method=full to train from scratch")
  c = base_config()
  c.total_steps = 200
  c.batch_size = 32
  c.log_every = 25
  c.checkpoint_every = 50
  c.data.name = folder.PREFIX + str(a.path)
  c.data.image_size = a.image_size
  c.model.num_classes = len(folder.class_names(str(a.path)))
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  if a.init:
    init_from_source(c, a.init)
  return finetune_digits.apply_method(c, a.method, rank=a.rank, lp_steps=a.lp_steps,
                                      unfreeze_every=a.unfreeze_every)
