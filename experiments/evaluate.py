"""Evaluate a run's checkpoints (all not yet evaluated, one with --step, or follow it with --watch).

  python -m experiments.evaluate --config=experiments/configs/pretrain_digits.py --workdir=/tmp/pre \
      [--watch] [--step=N]

Appends one JSON object per evaluated step to WORKDIR/eval_metrics.jsonl (and TensorBoard).
"""
from absl import flags
from ml_collections import config_flags

from experiments import cli
from jtl import evaluate

config_flags.DEFINE_config_file("config", None, "The run's config file (path[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints until the final step is evaluated.")
flags.DEFINE_integer("step", None, "Evaluate only this step.")
flags.DEFINE_float("timeout", 3600.0, "With --watch: give up after this many seconds.")
flags.DEFINE_float("poll_every", 5.0, "With --watch: seconds between looks at the workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  evaluate.evaluate_checkpoints(FLAGS.config, FLAGS.workdir, watch=FLAGS.watch, step=FLAGS.step,
                                timeout=FLAGS.timeout, poll_every=FLAGS.poll_every)


if __name__ == "__main__":
  cli.run(main)
