"""Train (or resume) one experiment.

  python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=/tmp/pre \
      [--config.total_steps=500 ...]

Re-running the same command resumes from the latest checkpoint; SIGTERM/SIGINT saves and exits 0.
"""
from absl import flags
from ml_collections import config_flags

from experiments import cli
from jtl import train

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go (local or gs://).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  train.train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
