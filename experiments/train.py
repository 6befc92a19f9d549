"""Train (or resume) one experiment.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=runs/pre \
      [--config.total_steps=500 ...]

Re-running the same command resumes from the latest checkpoint; SIGTERM/SIGINT at any moment (start-up
included) saves what there is to save and exits 0. The workdir may be relative, absolute or remote
(gs://...). Exit codes: docs/reliability.md.
"""
from absl import flags

from experiments import cli
from jtl import signals


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config_flag(flag_values, argv, "Experiment config file (path[:args]).")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go (local or gs://).",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> None:
  from jtl import train  # pylint: disable=g-import-not-at-top  (after the signal handler, below)
  train.train(cli.load_config(flag_values), flag_values.workdir)


if __name__ == "__main__":
  signals.install()  # before jax and TensorFlow load: a SIGTERM during start-up stops cleanly too
  cli.run(define_flags, main)
