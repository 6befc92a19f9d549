"""SIGTERM/SIGINT as a request to stop cleanly, from the first moment of a run.

A scheduler's preemption notice (SIGTERM) or Ctrl-C (SIGINT) may come at any moment, start-up
included (imports, data, compilation, restore take seconds to minutes). The handler only records the
request; whoever runs the show looks at `requested()` where stopping is safe: the trainer between
start-up stages, the loop after a step (it saves a checkpoint, `jtl.loop`). So a signal never kills a
run half-way: it exits 0 with everything it had to save saved.

This module imports nothing heavy, so an entry point can install the handler before it imports jax.
Installs nest: the outermost one takes the signals over and clears the flag; `uninstall` at the same
depth gives them back.
"""
from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_previous: dict[int, Any] = {}
_depth = 0
_received: list[int] = []


def _handle(signum, frame):
  del frame
  _received.append(signum)
  try:  # (absl is imported by then in practice; the handler must never raise)
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("signal %d: stopping at the next safe point (a checkpoint is saved if there is "
                    "a step to save)", signum)
  except Exception:  # pylint: disable=broad-except
    pass


def install() -> None:
  """Takes SIGTERM/SIGINT over (the outermost call clears any earlier request)."""
  global _depth
  if _depth == 0:
    _received.clear()
    for sig in SIGNALS:
      _previous[sig] = signal.signal(sig, _handle)
  _depth += 1


def uninstall() -> None:
  """Undoes one `install`; the outermost gives the signals back to their previous handlers."""
  global _depth
  if _depth == 0:
    return
  _depth -= 1
  if _depth == 0:
    for sig, handler in _previous.items():
      signal.signal(sig, handler)
    _previous.clear()


def requested() -> bool:
  """Whether a stop signal came since the outermost `install`."""
  return bool(_received)
