"""Train (or resume) one experiment.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=runs/pre \
      [--config.total_steps=500 ...]

Re-running the same command resumes from the latest checkpoint; SIGTERM/SIGINT at any moment (start-up
included) saves what there is to save and exits 0. One trainer per workdir: a second one stops with an
error naming the first (docs/workdir_lock.md). The workdir may be relative, absolute or remote
(gs://...). Exit codes: docs/reliability.md.
"""
from jtl import signals

if __name__ == "__main__":
  signals.install()  # before jax and TensorFlow load (cli imports TensorFlow): a SIGTERM during
  # start-up stops cleanly too
# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags

from experiments import cli


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config_flag(flag_values, argv, "Experiment config file (path[:args]).")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go (local or gs://).",
                      flag_values=flag_values)
  flags.DEFINE_bool("take_over_lock", False, "Take the workdir's lock (WORKDIR/trainer.lock) even "
                    "if its holder looks alive; only when you are sure that trainer is gone.",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> None:
  # pylint: disable=g-import-not-at-top  (after the signal handler, below)
  import time

  import jax
  from absl import logging
  from jtl import checkpoint, pictures, progress, train
  from jtl.config import resolve_path
  from jtl.metric_writer import read_jsonl
  start = time.time()
  config = cli.load_config(flag_values)
  state = train.train(config, flag_values.workdir, take_over_lock=flag_values.take_over_lock)
  # Some objectives' runs end with a picture (style transfer: plots/*.png), drawn from checkpoints.
  if jax.process_index() == 0:
    pictures.after_training(config, flag_values.workdir)
  if jax.process_index() == 0:  # the last line: how far it got and where everything is
    workdir = resolve_path(flag_values.workdir)
    rows = read_jsonl(f"{workdir}/train_metrics.jsonl")
    logging.info("%s", progress.train_summary(
        workdir, None if state is None else int(state.step), config.total_steps,
        rows[-1] if rows else None, checkpoint.completed_steps(workdir), time.time() - start))


if __name__ == "__main__":
  cli.run(define_flags, main)
