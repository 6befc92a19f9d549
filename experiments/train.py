"""Train (or resume) one experiment.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=runs/pre \
      [--config.total_steps=500 ...]

Re-running the same command resumes from the latest checkpoint; SIGTERM/SIGINT saves and exits 0.
One trainer per workdir: a second one stops with an error naming the first (docs/workdir_lock.md).
The workdir may be relative, absolute or remote (gs://...).
"""
from absl import flags

from experiments import cli
from jtl import train


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config_flag(flag_values, argv, "Experiment config file (path[:args]).")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go (local or gs://).",
                      flag_values=flag_values)
  flags.DEFINE_bool("take_over_lock", False, "Take the workdir's lock (WORKDIR/trainer.lock) even "
                    "if its holder looks alive; only when you are sure that trainer is gone.",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> None:
  train.train(cli.load_config(flag_values), flag_values.workdir,
              take_over_lock=flag_values.take_over_lock)


if __name__ == "__main__":
  cli.run(define_flags, main)
