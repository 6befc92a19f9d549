"""Target task: digits 5–9 with K labelled examples per class, from scratch or from the pretrained run.

  python -m experiments.train \
      --config=experiments/configs/transfer_digits.py:mode=finetune,shots=1,pretrain=/tmp/jtl/pretrain \
      --workdir=/tmp/jtl/finetune

Modes (arguments: mode, shots=1, pretrain=<pretrain workdir, or a weights file .npz/.pt/.pth/
.safetensors>, reinit_stages=0, backbone_lr=1.0, head=new|printed, bn=train|frozen):
  scratch       all parameters trained from a random init;
  linear_probe  the whole pretrained backbone loaded and frozen (BatchNorm statistics too); only the
                head trains;
  finetune      the pretrained backbone loaded (except its top `reinit_stages` stages, which are
                re-initialised with the head), everything trains, the backbone at `backbone_lr` times
                the learning rate; with bn=frozen the BatchNorm scales and offsets do not train, so
                their running statistics stay the pretrained ones (a batch of a few images does not
                re-estimate them).
The head is new (random) by default; head=printed starts it from the pretrained printed-digits head's
rows for 5–9 (`init_from.remap`; a `pretrain_mixed_digits.py` source). Every run also saves and
evaluates step 0 (`checkpoint_initial`): with head=printed that is the zero-shot accuracy, before any
target step.

Source (0-4) and target (5-9) classes are disjoint, so the top of the pretrained network is specific to
the wrong classes: a frozen-feature linear probe is worse than scratch here, while fine-tuning all of it
beats scratch in the one-shot regime, but only matches a classifier on raw pixels (`jtl/baselines.py`).
The demo pretrains on more source data, `pretrain_mixed_digits.py` (handwritten 0-4 plus printed,
i.e. synthetic and elastically distorted, 0-9), then fine-tunes from the printed head's rows 5-9 with
BatchNorm frozen (`DEMO_RECIPE`). Its sweep `table` measures every variant (the README's table and
what made the difference), over shots 1, 2, 5 and `shots_seed` 0, 1, 2, beside the raw-pixel baselines:

  python -m experiments.sweep --config=experiments/configs/transfer_digits.py:sweep=table \
      --workdir=runs/transfer_table [--parallel=2]
  python -m experiments.report --workdir=runs/transfer_table
"""
from experiments.configs.common import base_config, parse_arg
from jtl import sweep

TARGET_CLASSES = (5, 6, 7, 8, 9)
MODES = ("scratch", "linear_probe", "finetune")
HEADS = ("new", "printed")
NUM_STAGES = 3  # cnn_small's default widths (32, 64, 128)
# The demo's fine-tuning arguments, for a `pretrain_mixed_digits.py` source; picked on shots_seed 3-6
# (not the reported 0-2), scored on the handwritten 5-9 of the train split (not the test split) (README).
DEMO_RECIPE = "mode=finetune,head=printed,bn=frozen"


def get_config(arg=None):
  a = parse_arg(arg, mode="finetune", shots=1, pretrain="/tmp/jtl/pretrain_digits", reinit_stages=0,
                backbone_lr=1.0, head="new", bn="train")
  if a.mode not in MODES:
    raise ValueError(f"unknown mode {a.mode!r}; use one of {', '.join(MODES)}")
  if a.head not in HEADS:
    raise ValueError(f"unknown head {a.head!r}; use one of {', '.join(HEADS)}")
  if a.bn not in ("train", "frozen"):
    raise ValueError(f"unknown bn {a.bn!r}; use train or frozen")
  if not 0 <= a.reinit_stages <= NUM_STAGES:
    raise ValueError(f"reinit_stages must be in 0..{NUM_STAGES}, got {a.reinit_stages}")
  c = base_config()
  c.total_steps = 200
  c.batch_size = 32
  c.log_every = 50
  c.checkpoint_every = 25  # small checkpoints; every one is kept for the learning curve
  c.keep_checkpoints = None
  c.checkpoint_initial = True  # step 0 is evaluated too: the transferred model before any target step
  c.data.labels = TARGET_CLASSES
  c.data.shots = a.shots
  c.data.augment = True
  c.model.num_classes = len(TARGET_CLASSES)
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  weights_file = str(a.pretrain).endswith((".npz", ".pt", ".pth", ".bin", ".safetensors"))
  if a.mode == "linear_probe":
    c.init_from.workdir = a.pretrain
    c.init_from.dont_load = ("params/head/.*",)
    c.trainable = (("params/head/.*", True), (".*", False))
    c.optim.lr = 1e-2
  if a.mode == "finetune":
    c.init_from.workdir = a.pretrain
    stages = "|".join(str(NUM_STAGES - i) for i in range(a.reinit_stages))
    c.init_from.dont_load = ("params/head/.*",) + ((
        f"params/backbone/stage({stages})/.*", f"model_state/batch_stats/backbone/stage({stages})/.*")
        if stages else ())
    if a.backbone_lr != 1.0:
      c.optim.lr_mults = (("params/backbone/.*", float(a.backbone_lr)),)
  if a.head == "printed" and a.mode != "scratch":
    c.init_from.remap = (("params/head/(kernel|bias)", r"params/heads/printed/\1", TARGET_CLASSES),)
  if a.bn == "frozen" and a.mode == "finetune":  # frozen BatchNorm params keep their running statistics
    c.trainable = (("params/backbone/.*/bn/.*", False), (".*", True))
  if weights_file and a.mode != "scratch":  # a weights file (jtl/pretrained) instead of a run
    c.init_from.path, c.init_from.workdir = a.pretrain, None
  return c


CONFIG = "experiments/configs/transfer_digits.py"
SWEEP_SHOTS = (1, 2, 5)
SWEEP_SEEDS = (0, 1, 2)  # shots_seed: which examples are labelled (the demo's recipe was picked on 3-6)
SOURCES = {  # name -> (pretraining config, its cell, the report's section heading)
    "handwritten": ("experiments/configs/pretrain_digits.py", "pretrain-handwritten",
                    "source: handwritten 0–4"),
    "mixed": ("experiments/configs/pretrain_mixed_digits.py", "pretrain-mixed",
              "source: handwritten 0–4 + elastic printed 0–9 (the demo)"),
}
# (source or None, row name, folder key, arguments) in table order.
TABLE = (
    (None, "scratch", "scratch", "mode=scratch"),
    ("handwritten", "linear_probe", "hw-probe", "mode=linear_probe"),
    ("handwritten", "finetune", "hw-finetune", "mode=finetune"),
    ("handwritten", "finetune, backbone lr ×0.1", "hw-finetune-blr0.1", "mode=finetune,backbone_lr=0.1"),
    ("handwritten", "finetune, backbone lr ×0.3", "hw-finetune-blr0.3", "mode=finetune,backbone_lr=0.3"),
    ("handwritten", "finetune, top stage re-initialised", "hw-finetune-reinit1",
     "mode=finetune,reinit_stages=1"),
    ("mixed", "linear_probe (new head)", "mixed-probe", "mode=linear_probe"),
    ("mixed", "linear_probe, printed head", "mixed-probe-printed", "mode=linear_probe,head=printed"),
    ("mixed", "finetune (new head)", "mixed-finetune", "mode=finetune"),
    ("mixed", "finetune, backbone lr ×0.3 (the previous demo recipe)", "mixed-finetune-blr0.3",
     "mode=finetune,backbone_lr=0.3"),
    ("mixed", "finetune, BatchNorm frozen", "mixed-finetune-bnfrozen", "mode=finetune,bn=frozen"),
    ("mixed", "finetune, printed head", "mixed-finetune-printed", "mode=finetune,head=printed"),
    ("mixed", "finetune, printed head, BatchNorm frozen (the demo's recipe)", "mixed-demo",
     DEMO_RECIPE),
)
PIXEL_ROWS = {"pixels_logreg": "pixels: logistic regression (C=1)",
              "pixels_1nn": "pixels: 1-nearest-neighbour"}
ZERO_SHOT = "zero-shot: the printed head's rows 5–9, no target label"


def get_sweep(name):
  """`table`: every transfer variant × shots 1, 2, 5 × shots_seed 0, 1, 2, the two pretraining runs
  they start from, the raw-pixel baselines on the same labelled examples, and the zero-shot row (step
  0 of the demo recipe's runs: the printed head's rows 5–9 before any target step)."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; transfer_digits.py has: table")
  cells = [sweep.Cell(cell, config=config, report=False) for config, cell, _ in SOURCES.values()]
  for k in SWEEP_SHOTS:
    column = f"{k} shot{'s' * (k > 1)}"
    for seed in SWEEP_SEEDS:
      where = f"_k{k}_s{seed}"
      for baseline, row in PIXEL_ROWS.items():
        cells.append(sweep.Cell(f"{baseline.replace('_', '-')}{where}", variant=row, seed=seed,
                                column=column, kind="baseline", baseline=baseline,
                                config=f"{CONFIG}:mode=scratch,shots={k}",
                                overrides={"data.shots_seed": seed}))
      for source, row, key, args in TABLE:
        pretrain = f",pretrain={{cell:{SOURCES[source][1]}}}" if source else ""
        section = SOURCES[source][2] if source else ""
        if key == "mixed-probe":  # first in its section: the demo recipe's step 0 (evaluated, as
          # checkpoint_initial saves it), before any target step
          cells.append(sweep.Cell(f"zero-shot{where}", variant=ZERO_SHOT, seed=seed, column=column,
                                  section=section, kind="view", of=f"mixed-demo{where}", step=0))
        cells.append(sweep.Cell(f"{key}{where}", variant=row, seed=seed, column=column,
                                section=section, config=f"{CONFIG}:{args},shots={k}{pretrain}",
                                overrides={"data.shots_seed": seed}))
  return sweep.Sweep(name, cells, metrics=("test/accuracy",), title=(
      "Few-shot transfer to handwritten digits 5–9: test accuracy at the final step, mean ± std "
      "(min–max) over shots_seed 0, 1, 2"))
