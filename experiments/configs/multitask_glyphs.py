"""Multitask learning on `glyphs`: five tasks read off the same images of the background scripts.

  python -m experiments.train --config=experiments/configs/multitask_glyphs.py:weighting=equal \
      --workdir=runs/mt_glyphs
  python -m experiments.evaluate --workdir=runs/mt_glyphs

Tasks (every one a feature of the `glyphs` dataset, jtl/data/glyphs.py):
  character  which of the 1,238 background characters (`label`)
  script     which of the 9 background scripts (`alphabet`)
  family     the font family that drew it: DejaVu Sans, Sans Mono, Serif, STIX, Computer Modern
  bold       whether the face is bold
  italic     whether the face is italic or oblique

The split is per character, not per script: `shots` (default 16) of each character's 20 instances
train, and the 4 left (`data.eval_split='rest'`) are the test set, so every test character was seen in
training, drawn by other fonts and distortions. The trunk is the few-shot ConvNet of
`protonet_glyphs.py` (four blocks of 64 channels).

Arguments (all optional): `arch`, `weighting`, `grad_space` as in `multitask_digits.py`; `tasks`, a
'+'-joined subset (e.g. tasks=character: the single-task reference); `shots`, training instances per
character; `scarce`, a task whose labels are scarce, kept on the fraction `labelled` (default 1/16:
one of each character's 16 training images for scarce=character) of each of its classes' training
images (`data.label_fraction`, jtl/data/labelled.py); the other tasks keep every label;
`scarce_weight`, with weighting=static, the scarce task's loss weight (the others' is 1).

Sweep `table`: the majority class and nearest neighbour on raw pixels (each task's own target), the
five single-task models and hard sharing of all five tasks with equal weights,
uncertainty weighting, DWA and UPGrad, and hard sharing of the character and script tasks alone,
seeds 0, 1, 2; each shared run's Delta_m is against the single-task runs of its own seed (30 runs of
1,000 steps):

  python -m experiments.sweep --config=experiments/configs/multitask_glyphs.py:sweep=table \
      --workdir=runs/multitask_glyphs [--parallel=2]
  python -m experiments.report --workdir=runs/multitask_glyphs

Sweep `scarce`: the script task labelled on 1 in 16 of each script's training images, alone and
shared with the character task (labelled on every image), against the pixels fitted on the same
labelled images, with equal loss weights and with the script's weight at 0.25; seeds 0, 1, 2
(12 runs):

  python -m experiments.sweep --config=experiments/configs/multitask_glyphs.py:sweep=scarce \
      --workdir=runs/multitask_glyphs_scarce [--parallel=2]
"""
import ml_collections

from experiments.configs import multitask_digits
from experiments.configs.common import parse_arg
from experiments.configs.represent_glyphs import NUM_BACKGROUND_CLASSES
from jtl import sweep

CONFIG = "experiments/configs/multitask_glyphs.py"
SEEDS = (0, 1, 2)
METHODS = ("equal", "uncertainty", "dwa", "upgrad")
SINGLE_TASK = "single-task (one model per task)"
BASELINES = {"majority": "majority class of the training images (no learning)",
             "pixels_1nn": "nearest neighbour on raw pixels (no learning)"}

TASKS = {
    "character": dict(kind="multiclass", num_outputs=NUM_BACKGROUND_CLASSES, feature="label"),
    "script": dict(kind="multiclass", num_outputs=9, feature="alphabet"),
    "family": dict(kind="multiclass", num_outputs=5),
    "bold": dict(kind="binary"),
    "italic": dict(kind="binary"),
}


def get_config(arg=None):
  a = parse_arg(arg, arch="hard", weighting="equal", grad_space="representation", tasks="",
                shots=16, scarce="", labelled=1 / 16, scarce_weight=1.0)
  chosen = [t for t in str(a.tasks).split("+") if t] or list(TASKS)
  unknown = [t for t in chosen if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {'+'.join(TASKS)}")
  c = multitask_digits.get_config(
      f"arch={a.arch},weighting={a.weighting},grad_space={a.grad_space}")
  c.total_steps = 1000
  c.batch_size = 128
  c.log_every = 100
  c.checkpoint_every = 500
  c.data.name = "glyphs"
  c.data.shots = int(a.shots)
  c.data.eval_split = "rest"
  c.model.widths = (64, 64, 64, 64)
  c.tasks = ml_collections.ConfigDict({t: TASKS[t] for t in chosen})
  if a.scarce:
    if a.scarce not in chosen:
      raise ValueError(f"scarce={a.scarce!r} is not one of the tasks {'+'.join(chosen)}")
    c.data.label_fraction = {TASKS[a.scarce].get("feature", a.scarce): float(a.labelled)}
  if float(a.scarce_weight) != 1.0:
    if not a.scarce or a.weighting != "static":
      raise ValueError("scarce_weight is the static loss weight of the scarce task: set scarce=TASK "
                       "and weighting=static")
    c.tasks[a.scarce].weight = float(a.scarce_weight)
  c.evals.test.split = "rest"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  return c


def _references(seed, tasks):
  """Overrides pointing each task's Delta_m reference at the single-task cell of `seed`."""
  return {f"evals.test.references.{task}": f"{{cell:single-{task}_s{seed}}}" for task in tasks}


def get_sweep(name):
  """`table`: the single-task references and hard sharing with `METHODS`, over `SEEDS`; `scarce`:
  few script labels, alone and beside the fully labelled character task."""
  if name == "scarce":
    return _scarce_sweep()
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; multitask_glyphs.py has: table, scarce")
  cells = [sweep.Cell(name.replace("_", "-"), variant=row, kind="baseline", baseline=name,
                      config=CONFIG) for name, row in BASELINES.items()]
  cells += [sweep.Cell(f"single-{task}_s{seed}", variant=SINGLE_TASK, seed=seed,
                      config=f"{CONFIG}:tasks={task}", overrides={"seed": seed})
           for seed in SEEDS for task in TASKS]
  for method in METHODS:
    for seed in SEEDS:
      cells.append(sweep.Cell(
          f"hard-{method}_s{seed}", variant=f"hard sharing, {method}", seed=seed,
          config=f"{CONFIG}:weighting={method}",
          overrides={"seed": seed, **_references(seed, TASKS)}))
  for seed in SEEDS:  # the character task with the one auxiliary task that shares its invariances
    cells.append(sweep.Cell(
        f"pair-equal_s{seed}", variant="hard sharing, character + script only, equal", seed=seed,
        config=f"{CONFIG}:tasks=character+script",
        overrides={"seed": seed, **_references(seed, ("character", "script"))}))
  return sweep.Sweep(name, cells, metrics=(*(f"rest/{t}/accuracy" for t in TASKS), "rest/delta_m"),
                     title=("glyphs, background scripts, 16 instances per character to train and the "
                            "other 4 to test: accuracy per task and Delta_m (%, against the single-task "
                            "runs of the same seed; positive = better), mean ± std (min–max) over seeds"))


def _scarce_sweep():
  pair = f"{CONFIG}:tasks=character+script,scarce=script"
  cells = [sweep.Cell(name.replace("_", "-"), variant=row, kind="baseline", baseline=name,
                      config=pair) for name, row in BASELINES.items()]
  for seed in SEEDS:
    cells += [
        sweep.Cell(f"single-script_s{seed}", variant="single-task, script (1 label in 16)",
                   seed=seed, config=f"{CONFIG}:tasks=script,scarce=script",
                   overrides={"seed": seed}),
        sweep.Cell(f"single-character_s{seed}", variant="single-task, character (every label)",
                   seed=seed, config=f"{CONFIG}:tasks=character", overrides={"seed": seed}),
        sweep.Cell(f"pair-equal_s{seed}", variant="hard sharing, character + script, equal",
                   seed=seed, config=pair,
                   overrides={"seed": seed, **_references(seed, ("character", "script"))}),
        sweep.Cell(f"pair-static_s{seed}",
                   variant="hard sharing, character + script, script's loss weight 0.25",
                   seed=seed, config=f"{pair},weighting=static,scarce_weight=0.25",
                   overrides={"seed": seed, **_references(seed, ("character", "script"))})]
  return sweep.Sweep("scarce", cells, metrics=("rest/character/accuracy", "rest/script/accuracy",
                                               "rest/delta_m"),
                     title=("glyphs, background scripts: the script labelled on 1 in 16 of each "
                            "script's training images, the character on all; accuracy on the 4 "
                            "held-out images per character and Delta_m (%, against the single-task "
                            "runs of the same seed), mean ± std (min–max) over seeds"))
