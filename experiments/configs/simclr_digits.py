"""SimCLR pretraining on digits 0-4, judged by kNN and ridge probes on frozen features.

  python -m experiments.train --config=experiments/configs/simclr_digits.py \
      --workdir=/tmp/jtl/simclr [--config.total_steps=600]
  python -m experiments.evaluate --workdir=/tmp/jtl/simclr

The encoder is the transfer configs' `cnn_small`, so a checkpoint is the `init_from` of
`transfer_digits.py` as it is (`pretrain=/tmp/jtl/simclr`). Evaluators (`config.evals`): kNN and a
closed-form ridge probe fitted on 1 and on 5 labelled examples per class of the *unseen* digits 5-9
(scored on every test digit of 5-9), and on the whole train split of the pretraining digits 0-4.
Options: `config.contrastive` (jtl/objectives/contrastive.py), `config.augment` (jtl/augment.py).

Argument `evals=table`: the evaluators of the contrastive table instead (`table_evals`: the same
probes for `shots_seed` 0, 1, 2, and the same again on raw pixels). Its sweep `table` (the table of
docs/contrastive.md) pretrains the supervised, SimCLR and SupCon encoders with those evaluators and
reports, per `shots_seed`, each encoder's probes, raw pixels and the SimCLR encoder at its random
init (step 0):

  python -m experiments.sweep --config=experiments/configs/simclr_digits.py:sweep=table \
      --workdir=runs/contrastive_table [--parallel=2]
  python -m experiments.report --workdir=runs/contrastive_table
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from jtl import augment, sweep
from jtl.objectives import contrastive

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
TABLE_SHOTS = (1, 5)
TABLE_SEEDS = (0, 1, 2)  # shots_seed: which labelled examples of 5-9 the probes are fitted on


def tag(k: int | None = None, seed: int | None = None, pixels: bool = False) -> str:
  """An evaluator's tag (its keys are `test/<tag>/knn_accuracy`, ...): `5-9_<k>shot` (k labelled
  examples per class of digits 5-9), with `_s<seed>` for a given shots_seed, or `0-4` (every train
  example of digits 0-4); `pixels_` first for the raw-pixel evaluators."""
  name = "0-4" if k is None else f"5-9_{k}shot" + ("" if seed is None else f"_s{seed}")
  return f"pixels_{name}" if pixels else name


def representation_evals(shots=(1, 5), seeds=None, pixels=False) -> ml_collections.ConfigDict:
  """kNN + ridge probe on K shots of digits 5-9 for each K (and each shots_seed of `seeds`; None:
  shots_seed 0, tags without the seed), and on all of digits 0-4; with `pixels`, each also on the
  raw pixels (`input="pixels"`)."""
  evals = {}
  for inputs in ("features", "pixels") if pixels else ("features",):
    prefix = "pixels_" if inputs == "pixels" else ""
    for k in shots:
      for seed in seeds or (None,):
        target = dict(labels=TARGET_CLASSES, shots=k, shots_seed=seed or 0)
        name = f"{prefix}5to9_{k}shot" + ("" if seed is None else f"_s{seed}")
        t = tag(k, seed, pixels=inputs == "pixels")
        evals[f"knn_{name}"] = dict(type="knn", data=target, tag=t, input=inputs)
        evals[f"probe_{name}"] = dict(type="linear_probe", data=target, tag=t, input=inputs)
    source = dict(labels=SOURCE_CLASSES)
    t = tag(pixels=inputs == "pixels")
    evals[f"knn_{prefix}0to4"] = dict(type="knn", data=source, tag=t, input=inputs)
    evals[f"probe_{prefix}0to4"] = dict(type="linear_probe", data=source, tag=t, input=inputs)
  return ml_collections.ConfigDict(evals)


def table_evals() -> ml_collections.ConfigDict:
  """The contrastive table's evaluators (`evals=table`): every probe for each of TABLE_SHOTS ×
  TABLE_SEEDS, on the encoder and on raw pixels."""
  return representation_evals(TABLE_SHOTS, TABLE_SEEDS, pixels=True)


def get_config(arg=None):
  a = parse_arg(arg, evals="default")
  if a.evals not in ("default", "table"):
    raise ValueError(f"unknown evals {a.evals!r}; use default or table")
  c = base_config()
  c.objective = "simclr"
  c.total_steps = 600
  c.batch_size = 128
  c.log_every = 50
  c.checkpoint_every = 200
  c.data.labels = SOURCE_CLASSES
  c.data.augment = False  # the views come from config.augment, on device
  c.model.num_classes = len(SOURCE_CLASSES)  # for the online probe only
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.contrastive = contrastive.default_config()
  # Chosen by a small sweep (temperature 0.5/0.2/0.1/0.05/0.03, crop scale, noise; 3 draws of the
  # 5-9 shots): a low temperature and pixel noise gave the best few-shot kNN on unseen digits.
  c.contrastive.temperature = 0.05
  c.augment = augment.default_config()
  c.augment.noise_prob = 0.5
  c.augment.noise_std = 0.1
  c.evals = table_evals() if a.evals == "table" else representation_evals()
  return c


SIMCLR = "experiments/configs/simclr_digits.py"
ENCODERS = {  # train cell -> (config, report row); each evaluates table_evals() (evals=table)
    "supervised": ("experiments/configs/pretrain_digits.py:evals=table", "supervised (CE on 0-4)"),
    "simclr": (f"{SIMCLR}:evals=table", "SimCLR (0-4)"),
    "supcon": ("experiments/configs/supcon_digits.py:evals=table", "SupCon (0-4)"),
}
# Report rows: (cell prefix, row, the encoder cell read, its step (None: the final one), pixels).
# Raw pixels and random init are read from the SimCLR run: its raw-pixel evaluators (the same at
# every step; they never touch the encoder) and its step 0 (the seed-0 init, before any step).
ROWS = (("pixels", "raw pixels", "simclr", None, True),
        ("init", "random init (cnn_small)", "simclr", 0, False),
        *((cell, row, cell, None, False) for cell, (_, row) in ENCODERS.items()))
METRICS = ("knn_accuracy", "linear_probe_accuracy")
SOURCE_COLUMN = "0-4, all labels"


def column(k: int | None) -> str:
  return SOURCE_COLUMN if k is None else f"{k} shot{'s' * (k > 1)}"


def get_sweep(name):
  """`table`: the three encoders trained once each (seed 0) and, for every report row × shots ×
  shots_seed, a view of that shots_seed's probes in the run's evaluation (renamed to
  `test/knn_accuracy` and `test/linear_probe_accuracy`), so the report's mean and min-max are over
  shots_seed; the `0-4, all labels` column has one value (no shots to draw)."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; simclr_digits.py has: table")
  # Only the steps the table reads are evaluated (28 evaluators a step): the final one, and for
  # SimCLR also step 0, saved (checkpoint_initial) and kept, with no checkpoint in between.
  only_final = {"keep_checkpoints": 1}
  with_init = {"checkpoint_initial": True, "keep_checkpoints": None,
               "checkpoint_every": get_config().total_steps}
  cells = [sweep.Cell(cell, config=config, report=False,
                      overrides=with_init if cell == "simclr" else only_final)
           for cell, (config, _) in ENCODERS.items()]
  for prefix, row, of, step, pixels in ROWS:
    for k, seed in [(k, s) for k in TABLE_SHOTS for s in TABLE_SEEDS] + [(None, None)]:
      t = tag(k, seed, pixels)
      cells.append(sweep.Cell(
          f"{prefix}_{'0-4' if k is None else f'k{k}_s{seed}'}", variant=row, seed=seed,
          column=column(k), kind="view", of=of, step=step,
          rename={f"test/{t}/{m}": f"test/{m}" for m in METRICS}))
  return sweep.Sweep(name, cells, metrics=tuple(f"test/{m}" for m in METRICS), title=(
      "Few-shot probes on the unseen digits 5-9 (kNN and ridge fitted on K labelled examples per "
      f"class, scored on every test digit of 5-9), mean ± std (min–max) over shots_seed "
      f"{', '.join(map(str, TABLE_SEEDS))}; encoders pretrained on digits 0-4; last column: fitted "
      "on every train digit of 0-4, scored on its test digits"))
