"""The main job (`make demo`): pretrain, then transfer to few-shot handwritten digits 5–9 three ways,
against two classifiers on raw pixels.

  python -m experiments.demo --workdir=workdirs/demo [--shots=1] [--source=mixed|handwritten]

Runs, each through the real CLI (`experiments.cell`: what `experiments.train` and then
`experiments.evaluate --workdir` run, in one process, as a sweep's cell; one start-up of TensorFlow
and JAX per run, not two): pretrain → scratch / linear_probe / finetune on K shots per target
class. Then fits the raw-pixel baselines (`jtl/baselines.py`: logistic regression and
1-nearest-neighbour) on the same K labelled examples per class and scores them on the same test
split. Prints a table (run, trainable and frozen parameters, target test accuracy, test examples)
and writes WORKDIR/plots/transfer_digits.png.

Sources (`--source`):
  mixed        (default) handwritten digits 0–4 plus printed digits 0–9 rendered from fonts and
               distorted elastically (`pretrain_mixed_digits.py`): sim-to-real, the target classes
               are seen only in print. finetune = transfer_digits.py's DEMO_RECIPE (the head starts
               from the printed head's rows 5–9, BatchNorm frozen); zero_shot = its step 0.
  handwritten  handwritten digits 0–4 only (`pretrain_digits.py`), plain full fine-tuning: the target
               classes are new, and transfer only matches the raw-pixel baselines.

Console: one line per run (on a terminal it follows the run's step lines in place), then the table.
A run that fails stops the demo with its `error:` line (or the end of its traceback) and its
command. `--verbosity=1` prints every command and everything the runs print instead.
"""
import json
import re
import subprocess
import sys
import time

from experiments import cli  # (first: TensorFlow's start-up notices, as in every entry point)
# pylint: disable=g-bad-import-order
from absl import app, flags, logging
from etils import epath

from experiments.configs import transfer_digits
from jtl import baselines, data, plots
from jtl.config import resolve_path
from jtl.metric_writer import read_jsonl

flags.DEFINE_string("workdir", "workdirs/demo", "Parent folder of the four runs.")
flags.DEFINE_integer("shots", 1, "Labelled target examples per class.")
flags.DEFINE_enum("source", "mixed", ["mixed", "handwritten"], "Pretraining data (see the docstring).")
flags.DEFINE_bool("fresh", True, "Delete earlier runs in --workdir first (False: resume them).")
FLAGS = flags.FLAGS

CONFIGS = "experiments/configs"
SOURCES = {  # --source -> (pretraining config, its metric on digits 0-4, description, finetune args)
    "mixed": ("pretrain_mixed_digits.py", "test/handwritten/accuracy",
              "handwritten digits 0-4 + elastic printed digits 0-9", transfer_digits.DEMO_RECIPE),
    "handwritten": ("pretrain_digits.py", "test/accuracy", "handwritten digits 0-4", "mode=finetune"),
}
MODES = {"scratch": "mode=scratch", "linear_probe": "mode=linear_probe"}
ZERO_SHOT_NOTE = "; zero_shot = finetune at step 0 (the printed head's rows 5-9, no target step yet)"


STEP_LINE = re.compile(r"\] (step \d+/\d+) .*\| ([\d.]+ steps/s, ETA \d+s)")
FAILURE_TAIL = 15  # lines of a run's output shown when it fails without an `error:` line


def verbose() -> bool:
  return logging.get_verbosity() >= logging.DEBUG


def run(module: str, config: str, workdir: epath.Path, label: str) -> float:
  """Runs one entry point to its end; returns its seconds. Quiet: its output is kept, and on a
  terminal its step lines update `label`'s line in place; if it fails, its error line (or the end of
  its output) and its command are printed and the demo exits with its status."""
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}"]
  start = time.time()
  if verbose():
    print("$", " ".join(cmd[1:]), flush=True)
    status, errors = subprocess.call(cmd + ["--verbosity=1"]), ""  # (its output is on the console)
  else:
    live = sys.stdout.isatty()
    output = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
      for line in child.stdout:
        output.append(line)
        step = STEP_LINE.search(line)
        if live and step:  # \r + clear to the end of the line: the same line, updated
          print(f"\r{label}: {step[1]}, {step[2]}\x1b[K", end="", flush=True)
    status = child.returncode
    errors = "".join([line for line in output if line.startswith("error:")]
                     or output[-FAILURE_TAIL:]).rstrip()
  if status:
    print(f"\n{label}: failed (exit {status}){':' if errors else ''}\n{errors}\n"
          f"the command: {' '.join(cmd[1:])}".replace("\n\n", "\n"), flush=True)
    sys.exit(status)
  return time.time() - start


def pixel_rows(shots: int) -> list[tuple[str, float, int]]:
  """(name, test accuracy, test examples) of each raw-pixel baseline on the transfer runs' data."""
  data_config = transfer_digits.get_config(f"mode=scratch,shots={shots}").data
  accuracy = baselines.pixel_baselines(data_config)
  n = data.num_examples(data_config, data_config.eval_split)
  return [(name, accuracy[name], n) for name in baselines.PIXELS]


def main(argv):
  del argv
  cli.own_lines_only()  # (the pixel baselines read the digits through TFDS, which talks at INFO)
  root = epath.Path(resolve_path(FLAGS.workdir))
  if FLAGS.fresh and root.exists():
    root.rmtree()
  start = time.time()
  pretrain_config, pretrain_metric, source_name, finetune_args = SOURCES[FLAGS.source]
  zero_shot = "head=printed" in finetune_args  # its step 0 is a zero-shot model worth a row
  pretrain = root / "pretrain_digits"
  jobs = [("pretrain", f"{CONFIGS}/{pretrain_config}", pretrain)]
  for name, args in {**MODES, "finetune": finetune_args}.items():
    jobs.append((name, f"{CONFIGS}/transfer_digits.py:{args},shots={FLAGS.shots},pretrain={pretrain}",
                 root / name))
  for i, (name, config, workdir) in enumerate(jobs):
    label = f"[{i + 1}/{len(jobs)}] {name}"
    live = sys.stdout.isatty() and not verbose()  # one line, rewritten in place
    back, clear = ("\r", "\x1b[K") if live else ("", "")
    print(f"{label}: training and evaluating", end="" if live else "\n", flush=True)
    seconds = run("experiments.cell", config, workdir, label)
    steps = read_jsonl(workdir / "train_metrics.jsonl")[-1]["step"]
    print(f"{back}{label}: trained {steps} steps and evaluated "
          f"{len(read_jsonl(workdir / 'eval_metrics.jsonl'))} checkpoints in {seconds:.0f} s "
          f"({workdir}){clear}", flush=True)

  rows, series = [], {}
  for name, _, workdir in jobs:
    evals = sorted(read_jsonl(workdir / "eval_metrics.jsonl"), key=lambda r: r["step"])
    counts = json.loads((workdir / "params.json").read_text())
    metric = pretrain_metric if name == "pretrain" else "test/accuracy"
    rows.append((name, f"{counts['trainable']:,}", f"{counts['frozen']:,}", evals[-1][metric],
                 evals[-1][metric.replace("accuracy", "num_examples")]))
    if name != "pretrain":
      series[name] = [(r["step"], r["test/accuracy"]) for r in evals]
    if name == "finetune" and zero_shot:  # its step 0: no target step yet
      first = evals[0]
      rows.append(("zero_shot", "-", "-", first["test/accuracy"], first["test/num_examples"]))
  rows[1:1] = [(name, "-", "-", acc, n) for name, acc, n in pixel_rows(FLAGS.shots)]
  plot = plots.curves(series, title=f"digits 5-9, {FLAGS.shots} shots/class",
                      ylabel="test accuracy", path=root / "plots" / "transfer_digits.png")
  print(f"plot: {plot}; total time: {time.time() - start:.0f}s")  # (the table is the last thing)
  print(f"\nfew-shot transfer on handwritten digits 5-9 ({FLAGS.shots} labelled examples per class); "
        f"pretrain = {source_name} (its row: test accuracy on handwritten 0-4); pixels_* = "
        "classifiers on raw pixels" + (ZERO_SHOT_NOTE if zero_shot else ""))
  print(f"{'run':<15}{'trainable':>11}{'frozen':>9}{'test acc':>10}{'examples':>10}")
  for name, trainable, frozen, acc, n in rows:
    print(f"{name:<15}{trainable:>11}{frozen:>9}{acc:>10.3f}{n:>10}")


if __name__ == "__main__":
  app.run(main)
