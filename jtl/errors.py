"""The one exception type for bad user input.

Raised before anything is compiled or written; `experiments/*.py` turn it into a one-line message and a
non-zero exit. The message must say what is wrong *and* how to fix it.
"""


class ConfigError(ValueError):
  """A user-facing configuration or input error with a one-line, actionable message."""
