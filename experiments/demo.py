"""The main job (`make demo`): pretrain on digits 0–4, transfer to few-shot digits 5–9 three ways.

  python -m experiments.demo --workdir=workdirs/demo [--shots=10]

Runs, each through the real CLI (`experiments.train`, then `experiments.evaluate` on its checkpoints):
pretrain → scratch / linear_probe / finetune on K shots per target class. Prints a table (mode,
trainable parameters, target test accuracy) and writes WORKDIR/plots/transfer_digits.png.
"""
import json
import subprocess
import sys
import time

from absl import app, flags
from etils import epath

from jtl import plots
from jtl.config import resolve_path
from jtl.metric_writer import read_jsonl

flags.DEFINE_string("workdir", "workdirs/demo", "Parent folder of the four runs.")
flags.DEFINE_integer("shots", 1, "Labelled target examples per class.")
flags.DEFINE_bool("fresh", True, "Delete earlier runs in --workdir first (False: resume them).")
FLAGS = flags.FLAGS

CONFIGS = "experiments/configs"
MODES = ("scratch", "linear_probe", "finetune")


def run(module: str, config: str, workdir: epath.Path) -> None:
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}"]
  print("$", " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL if module.endswith("evaluate") else None)


def main(argv):
  del argv
  root = epath.Path(resolve_path(FLAGS.workdir))
  if FLAGS.fresh and root.exists():
    root.rmtree()
  start = time.time()
  pretrain = root / "pretrain_digits"
  jobs = [("pretrain", f"{CONFIGS}/pretrain_digits.py", pretrain)]
  for mode in MODES:
    jobs.append((mode, f"{CONFIGS}/transfer_digits.py:mode={mode},shots={FLAGS.shots},"
                       f"pretrain={pretrain}", root / mode))
  for _, config, workdir in jobs:
    run("experiments.train", config, workdir)
    run("experiments.evaluate", config, workdir)

  rows, series = [], {}
  for name, _, workdir in jobs:
    evals = read_jsonl(workdir / "eval_metrics.jsonl")
    counts = json.loads((workdir / "params.json").read_text())
    rows.append((name, counts["trainable"], counts["frozen"], evals[-1]["test/accuracy"],
                 evals[-1]["test/num_examples"]))
    if name != "pretrain":
      series[name] = [(r["step"], r["test/accuracy"]) for r in evals]
  print(f"\nfew-shot transfer on digits 5-9 ({FLAGS.shots} labelled examples per class); "
        "pretrain = source task digits 0-4")
  print(f"{'run':<14}{'trainable':>11}{'frozen':>9}{'test acc':>10}{'examples':>10}")
  for name, trainable, frozen, acc, n in rows:
    print(f"{name:<14}{trainable:>11,}{frozen:>9,}{acc:>10.3f}{n:>10}")
  plot = plots.curves(series, title=f"digits 5-9, {FLAGS.shots} shots/class",
                      ylabel="test accuracy", path=root / "plots" / "transfer_digits.png")
  print(f"\nplot: {plot}\ntotal time: {time.time() - start:.0f}s")


if __name__ == "__main__":
  app.run(main)
