"""Knowledge distillation on the embedded handwritten digits: a CNN teacher, a tiny MLP student.

  python -m experiments.train --config=experiments/configs/distill_digits.py:mode=teacher \
      --workdir=runs/teacher
  python -m experiments.train \
      --config=experiments/configs/distill_digits.py:mode=kd,teacher=runs/teacher,shots=10 \
      --workdir=runs/kd
  python -m experiments.train --config=experiments/configs/distill_digits.py:mode=labels_only,shots=10 \
      --workdir=runs/labels_only
  python -m experiments.evaluate --workdir=runs/kd     # test/accuracy (student), test/teacher_accuracy

Arguments (all optional):
  mode      teacher      a supervised `cnn_small` on all of `sklearn_digits` train (the teacher);
            kd           the student distilled from `teacher` (objective `distill`, jtl/objectives/
                         distill.py): with `shots` set, CE + KD on the K labelled examples per class
                         (member `labelled`) and KD alone (alpha = 1, labels never read) on the whole
                         train split (member `unlabelled`), half of each batch each; without `shots`,
                         (1 - alpha) CE + alpha T^2 KL on every example;
            labels_only  the same student trained on the same labelled examples alone (objective
                         `supervised`, batch = the labelled share of a kd batch), the same steps.
  teacher   the teacher's workdir (kd only).
  shots     labelled examples per class for the student; None: the whole train split.
Options: --config.distill.{alpha,temperature,...} (see `jtl.objectives.distill.default_config`);
the student's widths: --config.model.hidden='(64,32)'.

The student's checkpoint lives under `params/student/...`; `jtl.student_export.export_student(
'runs/kd', 'runs/kd_student')` writes it as a supervised run that `experiments.evaluate` and
`init_from` read like any other.

Sweep `table` (the README's distillation table): the teacher, and the student with labels only and
with KD, with 5 labelled examples per class and with every label, seeds 0, 1, 2:

  python -m experiments.sweep --config=experiments/configs/distill_digits.py:sweep=table \
      --workdir=runs/distill_table [--parallel=2]
  python -m experiments.report --workdir=runs/distill_table
"""
import ml_collections

from experiments.configs.common import base_config, parse_arg
from jtl import sweep
from jtl.objectives import distill

MODES = ("teacher", "kd", "labels_only")
TEACHER_MODEL = dict(name="cnn_small", num_classes=10)


STUDENT_MODEL = dict(name="mlp", num_classes=10, hidden=(32,))


def get_config(arg=None):
  a = parse_arg(arg, mode="kd", teacher="/tmp/jtl/distill_teacher", shots=None)
  if a.mode not in MODES:
    raise ValueError(f"unknown mode {a.mode!r}; use one of {', '.join(MODES)}")
  c = base_config()
  c.data.augment = True
  c.optim.warmup_steps = 20
  c.log_every = 50
  c.checkpoint_every = 100
  if a.mode == "teacher":
    c.total_steps = 400
    c.batch_size = 64
    c.model = ml_collections.ConfigDict(TEACHER_MODEL)
    c.optim.lr = 3e-3
    return c
  c.total_steps = 300
  c.optim.lr = 3e-3
  c.model = ml_collections.ConfigDict(STUDENT_MODEL)
  # No random crops for the student: an MLP on flattened 8x8 pixels is not translation invariant,
  # and shifted digits held its training accuracy near 50% (the CNN teacher profits from them).
  c.data.augment = False
  # The test split of the plain dataset (no mixture): test/accuracy is the student's.
  c.evals = ml_collections.ConfigDict({"test": dict(type="metrics", data=dict(mixture={}))})
  if a.mode == "labels_only":
    c.batch_size = 32 if a.shots else 64
    c.data.shots = a.shots
    return c
  c.objective = "distill"
  c.distill = distill.default_config()
  c.distill.teacher_workdir = a.teacher
  c.trainable = (distill.TEACHER_RULE, (".*", True))  # the teacher is frozen: always the first rule
  c.batch_size = 64
  if a.shots:
    c.data.mixture = ml_collections.ConfigDict({"labelled": dict(shots=a.shots),
                                                "unlabelled": dict()})
    c.distill.unlabelled = ("unlabelled",)
  return c


CONFIG = "experiments/configs/distill_digits.py"
SWEEP_SEEDS = (0, 1, 2)
KD_SHOTS = 5
STUDENTS = {"labels only": "labels_only", "KD (alpha 0.5, T 4)": "kd"}
TEACHER_ROW = "teacher (cnn_small, all labels, 1 run)"


def get_sweep(name):
  """`table`: the MLP student, labels only or distilled from the cnn_small teacher, with 5 labels per
  class (KD also reads the unlabelled rest of the train split) and with every label, seeds 0, 1, 2;
  the teacher (one run) as a row of both columns."""
  if name != "table":
    raise ValueError(f"unknown sweep {name!r}; distill_digits.py has: table")
  columns = {f"{KD_SHOTS} labels/class (KD: + unlabelled train split)": KD_SHOTS,
             "all labels": None}
  cells = []
  for column, shots in columns.items():
    for row, mode in STUDENTS.items():
      for seed in SWEEP_SEEDS:
        cells.append(sweep.Cell(
            f"{mode.replace('_', '-')}-shots{shots}_s{seed}", variant=row, column=column, seed=seed,
            config=f"{CONFIG}:mode={mode},shots={shots}"
                   + (",teacher={cell:teacher}" if mode == "kd" else ""),
            overrides={"seed": seed}))
  cells.append(sweep.Cell("teacher", variant=TEACHER_ROW, column=next(iter(columns)),
                          config=f"{CONFIG}:mode=teacher"))
  cells.append(sweep.Cell("teacher-all-labels", variant=TEACHER_ROW, column="all labels",
                          kind="view", of="teacher"))  # the same run, shown in both columns
  return sweep.Sweep(name, cells, metrics=("test/accuracy",), title=(
      "Distillation: MLP student (32 hidden), sklearn_digits test accuracy, mean ± std (min–max) "
      "over seeds 0, 1, 2"))
