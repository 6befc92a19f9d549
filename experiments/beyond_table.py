"""Beyond transfer, measured: knowledge distillation and unsupervised domain adaptation on the digits.

  python -m experiments.beyond_table [--workdir=/tmp/jtl/beyond_table] [--seeds=0,1,2] [--parts=kd,da]

(a) Distillation (experiments/configs/distill_digits.py): a cnn_small teacher trained on all of
    `sklearn_digits` train; an MLP student (one hidden layer of 32) trained for the same 300 steps on
    labels alone or with KD (alpha 0.5, T 4), with 5 labelled examples per class (KD also distils
    the teacher on the whole train split, labels unread) and with every label.
(b) Domain adaptation, printed -> handwritten (dann_digits.py, coral_digits.py): accuracy on the
    held-out handwritten test split after 600 steps of source-only training (also with the target
    batch forwarded, its loss unchanged: the share of BatchNorm statistics of both domains in the
    other rows' gains), DANN, Deep CORAL and MMD, and of training on the labelled handwritten train
    split (the upper bound), same model.

Each cell: mean ± standard deviation over the seeds [min, max]. The "gain" rows are differences
paired by seed: runs of one seed start from the same initialisation and see the same labelled
examples (and, for the adaptation runs and KD with all labels, the same labelled batches in the
same order). Runs go in-process on one device, one checkpoint each; a workdir that already holds a
finished run is reused, so a second call only prints. Markdown tables on stdout.
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags, logging
from etils import epath

from experiments.configs import coral_digits, dann_digits, distill_digits
from jtl import evaluate, train
from jtl.metric_writer import read_jsonl

flags.DEFINE_string("workdir", "/tmp/jtl/beyond_table", "Where the runs go (reused if present).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the student and adaptation runs.")
flags.DEFINE_list("parts", ["kd", "da"], "Which tables: kd (distillation), da (domain adaptation).")
FLAGS = flags.FLAGS

KD_SHOTS = 5
DA_ROWS = {  # row -> (config module, argument)
    "source only": (dann_digits, "mode=source_only"),
    "source only, target through BatchNorm": (dann_digits, "mode=source_only_target_bn"),
    "DANN": (dann_digits, "mode=dann"),
    "Deep CORAL": (coral_digits, "method=coral"),
    "MMD": (coral_digits, "method=mmd"),
    "target supervised (upper bound)": (dann_digits, "mode=target_supervised"),
}


def run(config, workdir: epath.Path) -> dict[str, float]:
  """Trains (or reuses) one run on one device and returns its final evaluation row."""
  config.mesh.axes = (("data", 1),)
  config.checkpoint_every = config.total_steps
  config.log_every = config.total_steps
  config.keep_checkpoints = 1
  train.train(config, str(workdir))
  evaluate.evaluate_checkpoints(config, str(workdir))
  return read_jsonl(workdir / "eval_metrics.jsonl")[-1]


def cell(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ± {values.std():.3f} [{values.min():.3f}, {values.max():.3f}]"


def distillation_table(root: epath.Path, seeds: list[int]) -> None:
  teacher_dir = root / "kd_teacher"
  teacher = run(distill_digits.get_config("mode=teacher"), teacher_dir)["test/accuracy"]
  settings = {f"{KD_SHOTS} labels/class (KD: + unlabelled train split)": KD_SHOTS,
              "all labels": None}
  cells: dict[str, list[str]] = {"labels only": [], "KD (alpha 0.5, T 4)": [],
                                 "gain of KD (paired by seed)": []}
  for shots in settings.values():
    acc = {}
    for mode in ("labels_only", "kd"):
      acc[mode] = []
      for seed in seeds:
        config = distill_digits.get_config(f"mode={mode},teacher={teacher_dir},shots={shots}")
        config.seed = seed
        acc[mode].append(run(config, root / f"kd_{mode}_shots{shots}_s{seed}")["test/accuracy"])
    cells["labels only"].append(cell(acc["labels_only"]))
    cells["KD (alpha 0.5, T 4)"].append(cell(acc["kd"]))
    cells["gain of KD (paired by seed)"].append(
        cell(np.subtract(acc["kd"], acc["labels_only"])))
  print(f"\n(a) distillation: MLP student (32 hidden), sklearn_digits test accuracy, "
        f"{len(seeds)} seeds\n")
  print("| student | " + " | ".join(settings) + " |")
  print("|---|" + "---|" * len(settings))
  for name, row in cells.items():
    print(f"| {name} | " + " | ".join(row) + " |")
  print("| teacher (cnn_small, all labels, 1 run) | " + " | ".join([f"{teacher:.3f}"] * len(settings))
        + " |", flush=True)


def adaptation_table(root: epath.Path, seeds: list[int]) -> None:
  target, source = {}, {}
  for name, (module, arg) in DA_ROWS.items():
    target[name], source[name] = [], []
    for seed in seeds:
      config = module.get_config(arg)
      config.seed = seed
      row = run(config, root / f"da_{arg.split('=')[1]}_s{seed}")
      target[name].append(row["test/target/accuracy"])
      source[name].append(row["test/source/accuracy"])
  print(f"\n(b) domain adaptation printed -> handwritten: test accuracy, {len(seeds)} seeds\n")
  print("| method | handwritten (target) | gain over source only (paired) | printed (source) |")
  print("|---|---|---|---|")
  for name in DA_ROWS:
    gain = cell(np.subtract(target[name], target["source only"]))
    print(f"| {name} | {cell(target[name])} | {gain} | {cell(source[name])} |", flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(FLAGS.workdir)
  seeds = [int(s) for s in FLAGS.seeds]
  start = time.perf_counter()
  if "kd" in FLAGS.parts:
    distillation_table(root, seeds)
  if "da" in FLAGS.parts:
    adaptation_table(root, seeds)
  print(f"\n{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
