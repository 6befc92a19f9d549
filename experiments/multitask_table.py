"""Multi-digits (MultiMNIST protocol) accuracy per multitask method, over seeds, with single-task baselines.

  python -m experiments.multitask_table --workdir=runs/mt_table [--seeds=0,1,2] [--steps=600]
      [--methods=equal,uncertainty,...] [--arch=hard]

Trains `multitask_digits.py:data=multidigits` with each method (every loss weighting and every gradient
aggregator, representation space) and the two single-task references (`tasks=left`, `tasks=right`,
same trunk, same steps), each over the seeds, in-process on one device; evaluates the final
checkpoint on the 1,500 test pairs, and prints a Markdown table of left/right test accuracy (mean ± std
over seeds) and Delta_m against the single-task means. Runs are reused if present (delete the workdir to
start over).
"""
from __future__ import annotations

import numpy as np
from absl import app, flags, logging
from etils import epath

from experiments.configs import multitask_digits
from jtl import evaluate, train
from jtl.config import resolve_path
from jtl.metric_writer import read_jsonl
from jtl.multitask import aggregators, weighting

flags.DEFINE_string("workdir", "runs/multitask_table", "Where the runs go (reused if present).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order).")
flags.DEFINE_integer("steps", 600, "Training steps per run.")
flags.DEFINE_list("methods", list(weighting.WEIGHTINGS) + list(aggregators.AGGREGATORS),
                  "Weightings and aggregators to compare.")
flags.DEFINE_string("arch", "hard", "Sharing architecture.")
FLAGS = flags.FLAGS


def final_metrics(arg: str, seed: int, workdir: epath.Path) -> dict:
  config = multitask_digits.get_config(arg)
  config.seed = seed
  config.total_steps = FLAGS.steps
  config.checkpoint_every = FLAGS.steps
  config.mesh.axes = (("data", 1),)
  if not read_jsonl(workdir / "eval_metrics.jsonl"):
    train.train(config, str(workdir))
    evaluate.evaluate_checkpoints(config, str(workdir))
  return read_jsonl(workdir / "eval_metrics.jsonl")[-1]


def cell(values: list[float]) -> str:
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(resolve_path(FLAGS.workdir))
  seeds = [int(s) for s in FLAGS.seeds]
  single = {}
  for task in ("left", "right"):
    single[task] = [final_metrics(f"tasks={task},arch={FLAGS.arch}", seed,
                                  root / f"single_{task}_s{seed}")[f"test/{task}/accuracy"]
                    for seed in seeds]
  print(f"\nmulti-digits, arch={FLAGS.arch}, {FLAGS.steps} steps, test accuracy mean ± std over "
        f"seeds {FLAGS.seeds}")
  print("| method | left | right | Delta_m (%) |\n|---|---|---|---|")
  print(f"| single-task (one model per task) | {cell(single['left'])} | {cell(single['right'])} | 0 |")
  reference = {task: np.mean(v) for task, v in single.items()}
  for method in FLAGS.methods:
    rows = [final_metrics(f"weighting={method},arch={FLAGS.arch}", seed,
                          root / f"{FLAGS.arch}_{method}_s{seed}") for seed in seeds]
    acc = {task: [r[f"test/{task}/accuracy"] for r in rows] for task in ("left", "right")}
    delta = [100 * np.mean([(r[f"test/{t}/accuracy"] - reference[t]) / reference[t]
                            for t in ("left", "right")]) for r in rows]
    print(f"| {method} | {cell(acc['left'])} | {cell(acc['right'])} | "
          f"{np.mean(delta):+.2f} ± {np.std(delta):.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
