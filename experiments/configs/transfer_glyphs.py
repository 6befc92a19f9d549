"""Few-shot transfer to handwritten digits 5-9 from a source without digits: the `glyphs` characters.

  python -m experiments.train --config=experiments/configs/pretrain_glyphs.py \
      --workdir=runs/pretrain_glyphs
  python -m experiments.train \
      --config=experiments/configs/transfer_glyphs.py:mode=finetune,shots=1 --workdir=runs/ft_glyphs
  python -m experiments.evaluate --workdir=runs/ft_glyphs

The target task, its arguments and every mode are `transfer_digits.py`'s (mode=scratch|linear_probe|
finetune, shots, pretrain, reinit_stages, backbone_lr, bn); only the default `pretrain` differs:
`runs/pretrain_glyphs`, a `pretrain_glyphs.py` run (cross-entropy over the 1,238 background
characters of `glyphs/optdigits`, the handwritten digits' own 8x8 format; no digit in the source).
head=printed needs a printed-digits head, which a glyphs run has not.

Its sweep `table` puts the glyph-pretrained linear probe and fine-tuning beside the raw-pixel
baselines, scratch, and the printed-digits recipe of `transfer_digits.py` (its pretraining, whose
source *has* printed 5-9, with a new head and with the demo's recipe), over shots 1, 2, 5 and
`shots_seed` 0, 1, 2 (docs/glyphs_transfer.md):

  python -m experiments.sweep --config=experiments/configs/transfer_glyphs.py:sweep=table \
      --workdir=runs/transfer_glyphs [--parallel=2]
  python -m experiments.report --workdir=runs/transfer_glyphs
"""
from experiments.configs import transfer_digits
from experiments.configs.common import parse_arg
from jtl import sweep

CONFIG = "experiments/configs/transfer_glyphs.py"
PRETRAIN = "runs/pretrain_glyphs"
SOURCES = {  # name -> (pretraining config, its cell, the report's section heading)
    "glyphs": ("experiments/configs/pretrain_glyphs.py", "pretrain-glyphs",
               "source: glyphs/optdigits, 1,238 characters of 9 scripts, no digits"),
    "mixed": transfer_digits.SOURCES["mixed"],
}
# (source or None, row name, folder key, arguments) in table order.
TABLE = (
    (None, "scratch", "scratch", "mode=scratch"),
    ("glyphs", "linear_probe", "glyphs-probe", "mode=linear_probe"),
    ("glyphs", "finetune", "glyphs-finetune", "mode=finetune"),
    ("glyphs", "finetune, BatchNorm frozen", "glyphs-finetune-bnfrozen", "mode=finetune,bn=frozen"),
    ("mixed", "finetune (new head)", "mixed-finetune", "mode=finetune"),
    ("mixed", "finetune, printed head, BatchNorm frozen (the demo's recipe)", "mixed-demo",
     transfer_digits.DEMO_RECIPE),
)


def get_config(arg=None):
  """`transfer_digits.py`'s config with `pretrain` defaulting to `runs/pretrain_glyphs`."""
  a = parse_arg(arg, mode="finetune", shots=1, pretrain=PRETRAIN, reinit_stages=0, backbone_lr=1.0,
                head="new", bn="train")
  return transfer_digits.get_config(",".join(f"{k}={v}" for k, v in a.items()))


def get_sweep(name):
  """`table`: the glyph-pretrained and printed-digits transfer variants × shots 1, 2, 5 ×
  shots_seed 0, 1, 2, the two pretraining runs they start from, and the raw-pixel baselines and
  scratch on the same labelled examples."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; transfer_glyphs.py has: table")
  cells = [sweep.Cell(cell, config=config, report=False) for config, cell, _ in SOURCES.values()]
  for k in transfer_digits.SWEEP_SHOTS:
    column = f"{k} shot{'s' * (k > 1)}"
    for seed in transfer_digits.SWEEP_SEEDS:
      where = f"_k{k}_s{seed}"
      for baseline, row in transfer_digits.PIXEL_ROWS.items():
        cells.append(sweep.Cell(f"{baseline.replace('_', '-')}{where}", variant=row, seed=seed,
                                column=column, kind="baseline", baseline=baseline,
                                config=f"{CONFIG}:mode=scratch,shots={k}",
                                overrides={"data.shots_seed": seed}))
      for source, row, key, args in TABLE:
        pretrain = f",pretrain={{cell:{SOURCES[source][1]}}}" if source else ""
        cells.append(sweep.Cell(f"{key}{where}", variant=row, seed=seed, column=column,
                                section=SOURCES[source][2] if source else "",
                                config=f"{CONFIG}:{args},shots={k}{pretrain}",
                                overrides={"data.shots_seed": seed}))
  return sweep.Sweep(name, cells, metrics=("test/accuracy",), title=(
      "Few-shot transfer to handwritten digits 5–9 from glyphs (no digits) and from printed digits: "
      "test accuracy at the final step, mean ± std (min–max) over shots_seed 0, 1, 2"))
