"""Lines that say what a run is doing during its long silent moments (here: XLA compilation)."""
from __future__ import annotations

import time
from typing import Any, Callable

from absl import logging


def announce_first_call(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
  """`fn` (a jitted step) that logs a line before its first call and how long that call took.

  The first call of a jitted function traces and compiles it (5-30 s on a CPU, longer for big
  models) before it dispatches: without a line the run looks hung between its parameter table and
  its first step line. Later calls go straight to `fn`.
  """
  first = True

  def call(*args: Any, **kwargs: Any) -> Any:
    nonlocal first
    if not first:
      return fn(*args, **kwargs)
    first = False
    logging.info("compiling %s (the first step waits for XLA)", what)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    logging.info("compiled %s in %.1f s", what, time.perf_counter() - start)
    return out
  return call
