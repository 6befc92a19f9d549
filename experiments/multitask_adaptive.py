"""Fully-adaptive feature sharing (Lu et al. 2017): widen a multitask trunk top-down, round by round.

  python -m experiments.multitask_adaptive --workdir=runs/adaptive [--data=attributes] \
      [--rounds=3] [--steps=300] [--num_groups=2]

Round 0 trains the thin network: every stage one branch shared by all tasks (hard sharing). After each
round, the per-example errors of every task on the training split give Lu et al.'s task affinity (the
probability that two tasks find an example both easy or both hard); the junction stage (the top-most
stage still fully shared) is split into at most `num_groups` branches by clustering the tasks with that
affinity; the round's weights are copied into the widened network (each new branch starts as the
branch it split from, so the widened network computes the same function) and saved as a weights file
that the next round starts from. Every round is an ordinary run through the CLI
(`experiments.train`, `experiments.evaluate`) in WORKDIR/round<r>. Prints the branch structure chosen
in each round and its test metrics.
"""
from __future__ import annotations

import ast
import subprocess
import sys

import jax
import numpy as np
from absl import app, flags
from etils import epath

from jtl import checkpoint, evaluate
from jtl import config as config_lib
from jtl.evaluators import collect, split_batches
from jtl.metric_writer import read_jsonl
from jtl.multitask import adaptive
from jtl.pretrained import save_npz

flags.DEFINE_string("workdir", "runs/multitask_adaptive", "Parent folder of the rounds.")
flags.DEFINE_enum("data", "attributes", ["attributes", "multidigits"], "multitask_digits.py data.")
flags.DEFINE_integer("rounds", 3, "Widening rounds after the thin round (at most the stage count).")
flags.DEFINE_integer("steps", 300, "Training steps per round.")
flags.DEFINE_integer("num_groups", 2, "Branches a group splits into per round (at most).")
flags.DEFINE_string("model_widths", "(32,64,128)", "cnn_small widths of the trunk (3 stages).")
FLAGS = flags.FLAGS

CONFIG = "experiments/configs/multitask_digits.py"


def run(module: str, *args: str) -> None:
  cmd = [sys.executable, "-m", module, *args]
  print("$", " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True)


def per_task_errors(workdir: epath.Path) -> tuple[np.ndarray, list[str]]:
  """Per-example errors [N, T] of the round's final checkpoint on the training split."""
  config = config_lib.load_run_config(workdir)
  s, _ = evaluate.setup_for_eval(config_lib.prepare(config))
  _, variables = checkpoint.load_variables(workdir)
  names = [t.name for t in s.objective.tasks]
  make_batches, _ = split_batches(s, config.data, config.data.train_split, config.batch_size)

  def errors(params, model_state, batch):
    metrics = s.objective.eval_metrics(params, model_state, batch)
    return {name: metrics[f"{name}/loss"] for name in names}
  out = collect(s, errors, make_batches, jax.device_put(variables["params"]),
                jax.device_put(variables["model_state"]))
  return np.stack([out[name] for name in names], axis=1), names


def main(argv):
  del argv
  root = epath.Path(config_lib.resolve_path(FLAGS.workdir))
  tasks = None
  branches, weights, rows = None, None, []
  for r in range(FLAGS.rounds + 1):
    workdir = root / f"round{r}"
    args = [f"--config={CONFIG}:data={FLAGS.data},arch=adaptive", f"--workdir={workdir}",
            f"--config.total_steps={FLAGS.steps}", f"--config.model.widths={FLAGS.model_widths}"]
    if branches is not None:
      args += [f"--config.multitask.arch_options.branches={branches!r}",
               f"--config.init_from.path={weights}", "--config.init_from.dont_load=()"]
    run("experiments.train", *args)
    run("experiments.evaluate", f"--workdir={workdir}")
    final = read_jsonl(workdir / "eval_metrics.jsonl")[-1]
    errors, tasks = per_task_errors(workdir)
    if branches is None:  # round 0: the thin default, every stage one group
      num_stages = len(ast.literal_eval(FLAGS.model_widths))
      branches = tuple((tuple(tasks),) for _ in range(num_stages))
    rows.append((r, branches, final))
    affinity = adaptive.task_affinity(errors)
    print(f"round {r}: branches {branches}\ntask affinity ({', '.join(tasks)}):\n"
          f"{np.array2string(affinity, precision=2)}", flush=True)
    if r == FLAGS.rounds:
      break
    widened = adaptive.split_top(branches, affinity, FLAGS.num_groups, tasks)
    if widened == branches:
      print("nothing left to split: every stage already has one branch per task")
      break
    _, variables = checkpoint.load_variables(workdir)
    weights = root / f"round{r + 1}_init.npz"
    save_npz({name: adaptive.widen(variables[name], branches, widened)
              for name in ("params", "model_state")}, weights)
    branches = widened

  print("\n| round | branches (bottom to top) | " + " | ".join(tasks) + " |")
  print("|---|---|" + "---|" * len(tasks))
  for r, structure, final in rows:
    cells = []
    for task in tasks:
      key = next((k for k in (f"test/{task}/accuracy", f"test/{task}/label_accuracy",
                              f"test/{task}/noise_variance") if k in final), None)
      cells.append(f"{final[key]:.3f}" if key else "-")
    text = " / ".join("{" + ", ".join("+".join(g) for g in stage) + "}" for stage in structure)
    print(f"| {r} | {text} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
