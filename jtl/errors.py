"""Exceptions users see: bad input (ConfigError, exit 2) and runs that cannot go on (RunError, exit 3).

Raised before anything is compiled or written; `experiments/*.py` turn it into a one-line message and a
non-zero exit. The message must say what is wrong *and* how to fix it.
"""


class ConfigError(ValueError):
  """A user-facing configuration or input error with a one-line, actionable message."""


class RunError(RuntimeError):
  """A run that started well but cannot go on (one line: what happened, what is kept, what to do).

  The CLI prints it as `error: ...` and exits with status 3 (2 is for bad input)."""


class NonFiniteError(RunError):
  """The loss or a metric became NaN/Inf; the last good checkpoint is kept."""
