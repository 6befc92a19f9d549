"""Shared absl entry-point plumbing: one-line errors, optional multi-host start-up.

Every bad input — an unknown `--config.key`, a config file that does not exist, a ConfigError raised
while the experiment is set up — ends as one line on stderr and exit status 2, before anything is
compiled or written.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported
from typing import Callable

from absl import app, flags, logging

from jtl.errors import ConfigError

flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-host runs (jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (Cloud TPU pods, SLURM).")

FLAGS = flags.FLAGS


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except (flags.Error, ConfigError, FileNotFoundError, KeyError, ValueError, TypeError,
          AttributeError) as e:
    _fail(" ".join(str(e).split()) or type(e).__name__)
  return []


def _start_distributed() -> None:
  if FLAGS.coordinator_address or FLAGS.distributed:
    import jax
    # Only used by the CPU backend (multi-process tests on one machine); must precede initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


class _OwnInfoOnly(py_logging.Filter):
  """INFO lines from jtl itself; libraries (orbax, tfds, XLA) only from WARNING up. --verbosity=1
  shows everything."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING or logging.get_verbosity() >= logging.DEBUG:
      return True
    return any(part in record.pathname for part in ("/jtl/", "/experiments/"))


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` with one-line, exit-2 handling of configuration errors."""
  def wrapped(argv):
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    _start_distributed()
    try:
      main(argv)
    except ConfigError as e:
      logging.flush()
      _fail(" ".join(str(e).split()))
  app.run(wrapped, flags_parser=_parse_flags)
