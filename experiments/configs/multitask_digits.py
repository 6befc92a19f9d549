"""Multitask learning on embedded digits: every sharing architecture x every weighting from the CLI.

  python -m experiments.train \
      --config=experiments/configs/multitask_digits.py:data=multidigits,arch=hard,weighting=pcgrad \
      --workdir=runs/mt_hard_pcgrad
  python -m experiments.evaluate --workdir=runs/mt_hard_pcgrad

Arguments (all optional):
  data       multidigits  `multi_digits`: two overlapping digits per 12x12 image, tasks `left` and
                          `right` (MultiMNIST protocol, jtl/data/multidigits.py)
             attributes   `digit_attributes`: one 8x8 digit, tasks `class` (10-way), `parity` and
                          `ge5` (binary), `segments` (7 seven-segment labels, multi-label), `ink`
                          (regression of the mean intensity) (jtl/data/attributes.py)
             mixture      one dataset per task: `handwritten` (sklearn_digits) and `printed`
                          (printed_digits), each step a batch of each (config.data.mixture)
  arch       hard | soft_l2 | soft_trace | cross_stitch | sluice | relationship | low_supervision
             | adaptive
  weighting  equal | static | uncertainty | dwa | rlw | gradnorm | famo   (loss weighting), or
             pcgrad | mgda | cagrad | imtl | nash | upgrad                (gradient aggregation)
  grad_space representation | shared_params (where aggregators take per-task gradients)
  tasks      a '+'-joined subset of the data's tasks (e.g. tasks=left: the single-task reference)
  model      the trunk: cnn_small (default) | mlp | resnet_small | any registry model for the archs
             that take one (hard, soft_*, relationship)

Architecture and weighting options: --config.multitask.arch_options.KEY=VALUE and
--config.multitask.weighting_options.KEY=VALUE (the component lists its valid keys on a typo).
Evaluation: `test/<task>/<metric>` per task; with --config.evals.test.references.<task>=<single-task
run's workdir, or a number>, also `test/delta_m` (the mean relative change against single-task
references, in %, Maninis et al. 2019; sign: positive = better than single-task).

Sweep `table` (the README's multitask table): every weighting and aggregator with hard sharing on
multi-digits, and the single-task references (`tasks=left`, `tasks=right`, one row), seeds 0, 1, 2;
each method run's Delta_m is against the single-task runs of its own seed:

  python -m experiments.sweep --config=experiments/configs/multitask_digits.py:sweep=table \
      --workdir=runs/multitask_table [--parallel=2]
  python -m experiments.report --workdir=runs/multitask_table
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from jtl import sweep
from jtl.multitask.aggregators import AGGREGATORS
from jtl.multitask.weighting import WEIGHTINGS
from jtl.objectives.multitask import default_config as multitask_defaults

DATASETS = {
    "multidigits": ("multi_digits", {
        "left": dict(kind="multiclass", num_outputs=10),
        "right": dict(kind="multiclass", num_outputs=10)}),
    "attributes": ("digit_attributes", {
        "class": dict(kind="multiclass", num_outputs=10, feature="label"),
        "parity": dict(kind="binary"),
        "ge5": dict(kind="binary"),
        "segments": dict(kind="multilabel", num_outputs=7),
        "ink": dict(kind="regression", num_outputs=1)}),
    "mixture": ("sklearn_digits", {
        "handwritten": dict(kind="multiclass", num_outputs=10, feature="label"),
        "printed": dict(kind="multiclass", num_outputs=10, feature="label")}),
}
MIXTURE = {"handwritten": dict(name="sklearn_digits"), "printed": dict(name="printed_digits")}


def get_config(arg=None):
  a = parse_arg(arg, data="multidigits", arch="hard", weighting="equal",
                grad_space="representation", tasks="", model="cnn_small")
  if a.data not in DATASETS:
    raise ValueError(f"unknown data {a.data!r}; use one of {', '.join(DATASETS)}")
  name, all_tasks = DATASETS[a.data]
  chosen = [t for t in str(a.tasks).split("+") if t] or list(all_tasks)
  unknown = [t for t in chosen if t not in all_tasks]
  if unknown:
    raise ValueError(f"unknown task(s) {', '.join(unknown)} for data={a.data}; choose from "
                     f"{'+'.join(all_tasks)}")
  c = base_config()
  c.objective = "multitask"
  c.total_steps = 600
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 200
  c.data.name = name
  if a.data == "mixture":
    c.data.mixture = ml_collections.ConfigDict({t: MIXTURE[t] for t in chosen})
  c.model = ml_collections.ConfigDict(dict(name=a.model))
  c.tasks = ml_collections.ConfigDict({t: all_tasks[t] for t in chosen})
  c.multitask = multitask_defaults()
  c.multitask.arch = a.arch
  c.multitask.weighting = a.weighting
  c.multitask.grad_space = a.grad_space
  c.evals = ml_collections.ConfigDict({"test": dict(type="multitask", split="test",
                                                    references=ml_collections.ConfigDict())})
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  return c


CONFIG = "experiments/configs/multitask_digits.py"
SWEEP_SEEDS = (0, 1, 2)
SINGLE_TASK = "single-task (one model per task)"


def get_sweep(name):
  """`table`: hard sharing on multi-digits with every weighting and aggregator × seeds 0, 1, 2, and the
  single-task references (one row: `left` from the tasks=left runs, `right` from the tasks=right runs)."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; multitask_digits.py has: table")
  cells = []
  for seed in SWEEP_SEEDS:
    for task in ("left", "right"):
      cells.append(sweep.Cell(f"single-{task}_s{seed}", variant=SINGLE_TASK, seed=seed,
                              config=f"{CONFIG}:data=multidigits,arch=hard,tasks={task}",
                              overrides={"seed": seed}))
  for method in (*WEIGHTINGS, *AGGREGATORS):
    for seed in SWEEP_SEEDS:
      cells.append(sweep.Cell(
          f"hard-{method}_s{seed}", variant=method, seed=seed,
          config=f"{CONFIG}:data=multidigits,arch=hard,weighting={method}",
          overrides={"seed": seed, **{f"evals.test.references.{task}": f"{{cell:single-{task}_s{seed}}}"
                                      for task in ("left", "right")}}))
  return sweep.Sweep(name, cells, metrics=("test/left/accuracy", "test/right/accuracy",
                                           "test/delta_m"), title=(
      "Multi-digits, hard sharing, cnn_small, 600 steps: test accuracy and Delta_m (%, against the "
      "single-task runs of the same seed; positive = better), mean ± std (min–max) over seeds 0, 1, 2"))
