"""Fine-tuning methods on the demo's transfer task: digits 5-9, K shots, from the digits 0-4 pretraining.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=/tmp/jtl/pre
  python -m experiments.train \
      --config=experiments/configs/finetune_digits.py:method=lora,shots=1,pretrain=/tmp/jtl/pre \
      --workdir=/tmp/jtl/ft_lora
  python -m experiments.evaluate --workdir=/tmp/jtl/ft_lora
  python -m experiments.export --workdir=/tmp/jtl/ft_lora --out=/tmp/jtl/ft_lora.npz  # merged weights

Arguments: method, and those of transfer_digits.py (shots=1, pretrain=<pretrain workdir or a weights
file .npz/.pt/.pth/.safetensors>, reinit_stages=0, backbone_lr=1.0), plus rank=4 (lora), lp_steps=50
(lpft) and unfreeze_every=40 (unfreeze). Every method loads the whole pretrained backbone:

  full          everything trains (transfer_digits.py mode=finetune).
  linear_probe  only the new head trains (trainable="head_only"); BatchNorm statistics frozen.
  llrd          full, with layer-wise learning-rate decay 0.75 (optim.layer_decay; BEiT, Bao et al.
                2022): the head at the full rate, each stage below it 0.75 times the one above.
  lpft          linear probe for `lp_steps`, then everything (Kumar et al. 2022, LP-FT): the head is
                fitted before the backbone's features can be distorted by a random head's gradients.
  unfreeze      gradual unfreezing (Howard & Ruder 2018, ULMFiT): the head first, then one more stage
                every `unfreeze_every` steps, top (stage3) down (stage1), each joining stage with fresh
                optimizer state (jtl/phases.py).
  lora          rank-`rank` LoRA adapters on the three conv kernels (alpha 2 * rank, so scale 2) and
                the head train; every pretrained weight is frozen (jtl/lora.py).
  bitfit        the biases (here the BatchNorm shifts: cnn_small's convolutions have none) and the
                head train (Ben Zaken et al. 2022); see jtl/masks.py.

The learning rates are the transfer task's 3e-3 for the methods that move pretrained weights and 1e-2
where only few, fresh parameters train (linear_probe, lora, bitfit: as transfer_digits.py's probe).
`python -m experiments.bench.finetune` measures every method; see its docstring.
"""
from __future__ import annotations

import ml_collections

from experiments.configs import transfer_digits
from experiments.configs.common import parse_arg
from jtl.masks import PRESETS

METHODS = ("full", "linear_probe", "llrd", "lpft", "unfreeze", "lora", "bitfit")
NUM_STAGES = transfer_digits.NUM_STAGES  # cnn_small: stage1..stage3
ALL = ((".*", True),)
# Phases spell the preset out: `phases.phase_config` assigns a phase's rules to `trainable`, which in
# a config read back from config.json (evaluation) is typed by its value there, a tuple.
HEAD_ONLY = PRESETS["head_only"]
LORA_RULES = ((".*/conv/kernel", True), (".*", False))  # the conv of every cnn_small stage
ADAPTERS = ".*/lora_[ab]"  # not in a checkpoint without adapters: always freshly initialised


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def unfreezing_phases(every: int, stages: int = NUM_STAGES) -> tuple:
  """((0, head), (every, head + top stage), ..., (stages * every, everything))."""
  out = [(0, HEAD_ONLY)]
  for k in range(1, stages):
    joined = "|".join(str(stages - i) for i in range(k))
    out.append((k * every, (("params/head/.*", True), (f"params/backbone/stage({joined})/.*", True),
                            (".*", False))))
  out.append((stages * every, ALL))
  return tuple(out)


def apply_method(c: ml_collections.ConfigDict, method: str, *, rank: int = 4, lp_steps: int = 50,
                 unfreeze_every: int = 40) -> ml_collections.ConfigDict:
  """Sets what trains, how, and the adapters for `method` on a config that already loads (or not)
  its init; returns `c`. Learning rates: 1e-2 for the few-parameter methods, else unchanged."""
  check_method(method)
  if method in ("linear_probe", "lora", "bitfit"):
    c.optim.lr = 1e-2
  if method == "linear_probe":
    c.trainable = "head_only"
  elif method == "llrd":
    c.optim.layer_decay = 0.75
  elif method == "lpft":
    c.phases = ((0, HEAD_ONLY), (lp_steps, ALL))
  elif method == "unfreeze":
    c.phases = unfreezing_phases(unfreeze_every)
  elif method == "lora":
    if not isinstance(rank, int) or rank < 1:  # else alpha = 2 * rank = 0 is what fails, far away
      raise ValueError(f"method=lora needs rank >= 1 adapters, got rank={rank!r}; pass e.g. "
                       ":method=lora,rank=4 (or choose another method, e.g. method=linear_probe)")
    c.trainable = "lora"
    c.lora.rules, c.lora.rank, c.lora.alpha = LORA_RULES, rank, 2.0 * rank
    c.init_from.dont_load = tuple(c.init_from.dont_load) + (ADAPTERS,)
  elif method == "bitfit":
    c.trainable = "bitfit"
  return c


def get_config(arg=None):
  a = parse_arg(arg, method="full", shots=1, pretrain="/tmp/jtl/pretrain_digits", reinit_stages=0,
                backbone_lr=1.0, rank=4, lp_steps=50, unfreeze_every=40)
  check_method(a.method)
  mode = "linear_probe" if a.method == "linear_probe" else "finetune"
  c = transfer_digits.get_config(f"mode={mode},shots={a.shots},pretrain={a.pretrain},"
                                 f"reinit_stages={a.reinit_stages},backbone_lr={a.backbone_lr}")
  return apply_method(c, a.method, rank=a.rank, lp_steps=a.lp_steps,
                      unfreeze_every=a.unfreeze_every)
