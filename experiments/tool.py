"""`__main__` plumbing shared by the tools that start or read runs without training in-process
(`experiments.sweep`, `experiments.report`): their absl flags parsed, bad input one `error:` line on
stderr and exit 2, as every other entry point (experiments/cli.py, which these do not import: it
starts TensorFlow, which the report does not need).

  def define_flags(flag_values): ...            registers the tool's flags
  def main(argv) -> int: ...                    runs it; returns the exit status
  if __name__ == "__main__":
    tool.run(define_flags, main)
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags

EXIT_BAD_INPUT = 2


def bad_input(error: Exception) -> int:
  """Prints `error: <error>` on stderr; returns the bad-input exit status (2)."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def run(define_flags: Callable[[flags.FlagValues], None], main: Callable[[list[str]], int],
        argv: Sequence[str] | None = None) -> NoReturn:
  """Defines the flags on absl's FLAGS, parses `argv` (default sys.argv) and exits with `main`'s
  status; a flag error (unknown flag, bad value, missing required flag) is one line, exit 2."""
  define_flags(flags.FLAGS)
  try:
    rest = flags.FLAGS(list(sys.argv if argv is None else argv))
  except flags.Error as e:
    sys.exit(bad_input(e))
  sys.exit(main(rest))
