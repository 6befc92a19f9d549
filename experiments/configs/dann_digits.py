"""Domain adaptation, printed -> handwritten digits: DANN and its baselines.

  python -m experiments.train --config=experiments/configs/dann_digits.py:mode=dann --workdir=runs/dann
  python -m experiments.evaluate --workdir=runs/dann     # test/target/accuracy, test/source/accuracy

Source: `printed_digits` (labelled; jtl/data/printed_digits.py). Target: `sklearn_digits` train split
without its labels (the training loss never reads them). Every step takes half its batch from each.
Evaluation (`config.evals.test`): the test split of both, as a mixture, so `test/target/accuracy` is
the accuracy on held-out handwritten digits and `test/source/accuracy` on printed ones.

Arguments (all optional):
  mode  source_only            the same model, steps and source batches, no adaptation
                               (domain.weight=0: the target batch is not even forwarded, so
                               BatchNorm sees printed digits only);
        source_only_target_bn  source only, but the target batch still goes through the model, so
                               BatchNorm's statistics are of both domains, as in the adapting runs
                               (domain.target_batchnorm): the part of their gain that this alone gives;
        dann                   domain-adversarial training (objective `dann`,
                               jtl/objectives/domain.py);
        target_supervised      the upper bound: the same model and steps trained on the *labelled*
                               handwritten train split (the `source` member here), no adaptation.
  init  a run's workdir (or a weights file) whose backbone every mode starts from, instead of a
        random init (the head starts fresh): e.g. a `pretrain_glyphs.py` run with this model's
        widths, a source without digits (docs/distillation.md).
Options: --config.domain.{weight,gamma,hidden,...} (`jtl.objectives.domain.default_config`).
coral_digits.py runs Deep CORAL and MMD on the same setting.

Sweep `table` (the domain adaptation table of docs/distillation.md): every mode here and
coral_digits.py's two methods, seeds 0, 1, 2; then source only, DANN and MMD again, starting from a
backbone pretrained on the 1,238 background characters of `glyphs/optdigits` (cross-entropy, this
model's widths; no digit in it):

  python -m experiments.sweep --config=experiments/configs/dann_digits.py:sweep=table \
      --workdir=runs/adaptation_table [--parallel=2]
  python -m experiments.report --workdir=runs/adaptation_table
"""
import ml_collections

from experiments.configs.common import base_config, init_from_source, parse_arg
from jtl import sweep
from jtl.objectives import domain

MODES = ("source_only", "source_only_target_bn", "dann", "target_supervised")
SOURCE, TARGET = "printed_digits", "sklearn_digits"
MODEL = dict(name="cnn_small", num_classes=10, widths=(16, 32, 64))


def domain_config(objective: str, mode: str, init: str = "") -> ml_collections.ConfigDict:
  """The shared setting of dann_digits.py and coral_digits.py; `mode` and `init` as in the docstring,
  with `adapt` meaning `objective`'s own method."""
  c = base_config()
  if init:  # the backbone; the head and DANN's domain classifier start fresh
    init_from_source(c, init)
    if objective == "dann":  # (and its schedule's step counter)
      c.init_from.dont_load += ("params/domain_classifier/.*", "model_state/domain/.*")
  c.objective = objective
  c.total_steps = 600
  c.batch_size = 64  # 32 source + 32 target
  c.log_every = 50
  c.checkpoint_every = 200
  c.data.augment = True
  c.model = ml_collections.ConfigDict(MODEL)
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.domain = domain.default_config()
  c.data.mixture = ml_collections.ConfigDict({"source": dict(name=SOURCE),
                                              "target": dict(name=TARGET)})
  if mode in ("source_only", "target_supervised"):
    c.domain.weight = 0.0
    c.batch_size = 32  # the source share of an adapting run's batch: the same labelled batches
    labelled = TARGET if mode == "target_supervised" else SOURCE
    c.data.mixture = ml_collections.ConfigDict({"source": dict(name=labelled)})
  if mode == "source_only_target_bn":
    c.domain.weight = 0.0
    c.domain.target_batchnorm = True
  c.evals = ml_collections.ConfigDict({"test": dict(type="metrics", data=dict(
      mixture={"source": dict(name=SOURCE), "target": dict(name=TARGET)}))})
  return c


def get_config(arg=None):
  a = parse_arg(arg, mode="dann", init="")
  if a.mode not in MODES:
    raise ValueError(f"unknown mode {a.mode!r}; use one of {', '.join(MODES)}")
  return domain_config("dann", a.mode, a.init)


SWEEP_SEEDS = (0, 1, 2)
ADAPTATION_ROWS = {  # row -> (folder key, config)
    "source only": ("source-only", "experiments/configs/dann_digits.py:mode=source_only"),
    "source only, target through BatchNorm": (
        "source-only-target-bn", "experiments/configs/dann_digits.py:mode=source_only_target_bn"),
    "DANN": ("dann", "experiments/configs/dann_digits.py:mode=dann"),
    "Deep CORAL": ("coral", "experiments/configs/coral_digits.py:method=coral"),
    "MMD": ("mmd", "experiments/configs/coral_digits.py:method=mmd"),
    "target supervised (upper bound)": (
        "target-supervised", "experiments/configs/dann_digits.py:mode=target_supervised"),
}
GLYPHS_PRETRAIN = "pretrain-glyphs"  # the cell: pretrain_glyphs.py with MODEL's widths
GLYPH_ROWS = {  # row -> (folder key, config): the same runs from the glyph-pretrained backbone
    "source only, from the glyph backbone": (
        "glyphs-source-only", "experiments/configs/dann_digits.py:mode=source_only"),
    "DANN, from the glyph backbone": ("glyphs-dann", "experiments/configs/dann_digits.py:mode=dann"),
    "MMD, from the glyph backbone": ("glyphs-mmd", "experiments/configs/coral_digits.py:method=mmd"),
}


def get_sweep(name):
  """`table`: printed -> handwritten, each adaptation method and the two references, seeds 0, 1, 2;
  source only, DANN and MMD from the glyph-pretrained backbone (and its pretraining run)."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; dann_digits.py has: table")
  cells = [sweep.Cell(f"{key}_s{seed}", variant=row, seed=seed, config=config,
                      overrides={"seed": seed})
           for row, (key, config) in ADAPTATION_ROWS.items() for seed in SWEEP_SEEDS]
  cells.append(sweep.Cell(GLYPHS_PRETRAIN, config="experiments/configs/pretrain_glyphs.py",
                          overrides={"model.widths": str(MODEL["widths"])}, report=False))
  cells += [sweep.Cell(f"{key}_s{seed}", variant=row, seed=seed,
                       config=f"{config},init={{cell:{GLYPHS_PRETRAIN}}}", overrides={"seed": seed})
            for row, (key, config) in GLYPH_ROWS.items() for seed in SWEEP_SEEDS]
  return sweep.Sweep(name, cells, metrics=("test/target/accuracy", "test/source/accuracy"), title=(
      "Domain adaptation printed -> handwritten: test accuracy on handwritten (target) and printed "
      "(source) digits, mean ± std (min–max) over seeds 0, 1, 2"))
