"""Evaluate a run's checkpoints (all not yet evaluated, one with --step, or follow it with --watch).

  python -m experiments.evaluate --workdir=runs/pre [--watch] [--step=N]
  python -m experiments.evaluate --workdir=runs/pre --config=experiments/configs/pretrain_digits.py

Without --config the run's own resolved config (WORKDIR/config.json) is used. With one, its `eval`
and `mesh` sections apply, and where it differs from the run's in anything else (model, data,
total_steps, ...) the differences are named and the run's values followed. Appends one JSON object per
evaluated step to WORKDIR/eval_metrics.jsonl (and TensorBoard).
"""
import time

import jax
from absl import flags, logging

from experiments import cli
from jtl import evaluate, progress
from jtl.config import resolve_path


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config_flag(flag_values, argv,
                         "Config file (path[:args]); default: the run's WORKDIR/config.json.")
  flags.DEFINE_string("workdir", None, "The training run's workdir.", flag_values=flag_values)
  flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints until the final step is "
                    "evaluated.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "Evaluate only this step.", flag_values=flag_values)
  flags.DEFINE_float("timeout", 3600.0, "With --watch: give up after this many seconds.",
                     flag_values=flag_values)
  flags.DEFINE_float("poll_every", 5.0, "With --watch: seconds between looks at the workdir.",
                     flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> None:
  start = time.time()
  rows = evaluate.evaluate_checkpoints(cli.load_config(flag_values), flag_values.workdir,
                                       watch=flag_values.watch, step=flag_values.step,
                                       timeout=flag_values.timeout,
                                       poll_every=flag_values.poll_every)
  summary = progress.eval_summary(resolve_path(flag_values.workdir), rows, time.time() - start)
  if summary and jax.process_index() == 0:  # the last line: what was evaluated, where the rows are
    logging.info("%s", summary)


if __name__ == "__main__":
  cli.run(define_flags, main)
