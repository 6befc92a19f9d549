"""Fine-tune a pretrained backbone on a standard TFDS benchmark at the weights' resolution.

  python -m experiments.train \
      --config=experiments/configs/finetune_tfds.py:dataset=cifar10,model=vit_small,weights=vit_small.pth,method=full \
      --workdir=runs/cifar10_vit
  python -m experiments.evaluate --workdir=runs/cifar10_vit

Arguments:
  dataset     a TFDS name (cifar10, cifar100, imagenet2012, oxford_iiit_pet, food101, ...), prepared
              in data_dir (default: TFDS's, which honours $TFDS_DATA_DIR; a gs:// path works);
              without network, `python -m experiments.fake_tfds` writes a stand-in with the real
              builder's features and random pixels.
  data_dir    where it is prepared.
  model       a jtl model (vit_tiny, vit_small, vit_base, resnet18, resnet50, ...).
  weights     a weights file (.pth/.pt/.safetensors/.npz: timm or big_vision ViT, torchvision
              ResNet, jtl's own) or a jtl workdir; none: from scratch (method=full only).
  method      full, linear_probe, lora (query/value projections of a ViT, 3x3 convs of a ResNet),
              bitfit, llrd, lpft or unfreeze (finetune_digits.py's).
  norm        the input normalisation the weights were trained with: imagenet (timm's and
              torchvision's mean/std), bit ([-1, 1], big_vision's), unit ([0, 1]); auto (default):
              bit for big_vision-named .npz files, else imagenet.
  image_size  224 (the weights' resolution; a ViT's position embeddings are resized to the new grid).
  crop        inception (default: random-resized crop + flip in training, resize to image_size/0.875
              and centre crop in evaluation) or resize (the whole image resized, no augmentation).
  eval_split  default `validation` for imagenet2012 and imagenette, else `test`.
  rank        LoRA rank (default 8).

Defaults follow the common fine-tuning recipe (Kolesnikov et al. 2020, Dosovitskiy et al. 2021):
SGD with momentum 0.9, lr 0.01 (0.1 for linear_probe and lora), cosine decay, 5% warmup, global-norm
clip 1, batch 512, 2,500 steps. On one small accelerator lower the batch (`--config.batch_size`) and
use `--config.grad_accum_steps`, `--config.precision=bfloat16`, `--config.model.remat=True`.
"""
from __future__ import annotations

import difflib

import numpy as np
import tensorflow_datasets as tfds

from experiments.configs import finetune_digits
from experiments.configs.common import base_config, init_from_source, parse_arg

NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "bit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "unit": "unit"}
VALIDATION_SPLIT = {"imagenet2012": "validation", "imagenette": "validation", "imagenet_v2": "test"}
VIT_LORA = ((".*/attn/(query|value)/kernel", True), (".*", False))
RESNET_LORA = ((".*/conv2/kernel", True), (".*", False))


def weights_norm(weights: str) -> str:
  """'bit' for a big_vision / vit_jax .npz (names under Transformer/), else 'imagenet'. Reads only
  the file's tensor names (an .npz is a zip: its index is cheap)."""
  if not weights.endswith(".npz"):
    return "imagenet"
  from etils import epath  # (gs:// too)
  with epath.Path(weights).open("rb") as f:
    names = np.load(f).files
  return "bit" if any(n.split("/")[0] in ("Transformer", "params") and "Transformer" in n
                      for n in names) else "imagenet"


def get_config(arg=None):
  a = parse_arg(arg, dataset="cifar10", data_dir="", model="vit_small", weights="", method="full",
                norm="auto", image_size=224, crop="inception", eval_split="", rank=8, lp_steps=250,
                unfreeze_every=500)
  finetune_digits.check_method(a.method)
  if a.norm not in (*NORMS, "auto"):
    raise ValueError(f"norm={a.norm!r}: choose one of {', '.join(NORMS)} or auto")
  if not a.weights and a.method != "full":
    raise ValueError(f"method={a.method} fine-tunes pretrained weights; pass weights=<file or "
                     "workdir>, or use method=full to train from scratch")
  base = a.dataset.split(":")[0].split("/")[0]
  known = tfds.list_builders(with_community_datasets=False)
  if base not in known:
    close = difflib.get_close_matches(base, known, n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise ValueError(f"unknown TFDS dataset {a.dataset!r}{hint}; pass dataset=<a TFDS image "
                     "classification dataset>, e.g. dataset=cifar10")
  builder = tfds.builder(a.dataset.split(":")[0])  # features come from code: no data needed
  if "image" not in builder.info.features or "label" not in builder.info.features:
    raise ValueError(f"dataset={a.dataset} has no 'image' and 'label' features "
                     f"({', '.join(builder.info.features)}); finetune_tfds.py classifies images")
  features = builder.info.features
  c = base_config()
  c.total_steps = 2500
  c.batch_size = 512
  c.log_every = 50
  c.checkpoint_every = 500
  c.data.name = a.dataset
  c.data.data_dir = a.data_dir or None
  c.data.eval_split = a.eval_split or VALIDATION_SPLIT.get(builder.name, "test")
  c.data.image_size = int(a.image_size)
  c.data.crop = a.crop
  c.data.flip = a.crop == "inception"
  # In memory when every image has one size (crops then run per batch); streamed otherwise.
  c.data.cache = None not in features["image"].shape[:2]
  norm = weights_norm(str(a.weights)) if a.norm == "auto" and a.weights else (
      "imagenet" if a.norm == "auto" else a.norm)
  c.data.normalize = NORMS[norm]
  c.model.name = a.model
  c.model.num_classes = features["label"].num_classes
  c.optim.name = "momentum"
  c.optim.lr = 0.1 if a.method in ("linear_probe", "lora") else 0.01
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = c.total_steps // 20
  c.optim.clip_norm = 1.0
  if a.weights:
    init_from_source(c, a.weights)
  lr = c.optim.lr
  c = finetune_digits.apply_method(c, a.method, rank=int(a.rank), lp_steps=int(a.lp_steps),
                                   unfreeze_every=int(a.unfreeze_every))
  c.optim.lr = lr  # (apply_method's 1e-2 is the digits' Adam rate)
  if a.method == "lora":
    c.lora.rules = VIT_LORA if a.model.startswith("vit") else RESNET_LORA
  return c
