"""Lines that say what a run is doing: during its long silent moments (XLA compilation), and where
it left its results when it ends (one summary line for a train run and one for an evaluation)."""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from absl import logging
from etils import epath

# The metrics a summary line names (the step lines name them all): the losses and the accuracies
# (`loss`, `test/accuracy`, `test/5way1shot_accuracy`), less the baselines written beside them,
# which no checkpoint changes (`test/5way1shot_pixel_accuracy`).
_MAIN = ("loss", "accuracy")
_BASELINES = ("pixel",)


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


def main_metrics(row: Mapping[str, Any]) -> str:
  """`loss=0.01 test/accuracy=0.98`: the row's losses and accuracies (per task or domain too)."""
  def main(key: str) -> bool:
    words = key.rsplit("/", 1)[-1].split("_")
    return words[-1] in _MAIN and not set(words) & set(_BASELINES)
  keys = [k for k in row if k != "step" and main(k)]
  return " ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row[k], (int, float)))


def train_summary(workdir: str | os.PathLike, step: int | None, total_steps: int,
                  last_row: Mapping[str, Any] | None, checkpoints: Sequence[int],
                  seconds: float) -> str:
  """The line a train run ends with: how far it got, its last metrics, and where everything is."""
  workdir = epath.Path(workdir)
  if step is None:
    done = "stopped by a signal before the first step; rerun the same command to start"
  elif step < total_steps:
    done = (f"stopped at step {step}/{total_steps} after {seconds:.0f} s; rerun the same command to "
            "resume")
  else:
    done = f"trained to step {step}/{total_steps} in {seconds:.0f} s"
  metrics = main_metrics(last_row) if last_row else ""
  kept = (f"checkpoints {workdir / 'checkpoints'} (steps {', '.join(map(str, checkpoints))})"
          if checkpoints else "no checkpoint")
  where = [kept, f"metrics {workdir / 'train_metrics.jsonl'}",
           f"TensorBoard: tensorboard --logdir={workdir}"]
  if (workdir / "plots").exists():
    where.append(f"plots {workdir / 'plots'}")
  return f"{done}{': ' + metrics if metrics else ''}; {'; '.join(where)}"


def eval_summary(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                 seconds: float) -> str | None:
  """The line an evaluation ends with (None if it evaluated nothing: it has said why already)."""
  if not rows:
    return None
  workdir = epath.Path(workdir)
  steps = sorted(row["step"] for row in rows)
  last = max(rows, key=lambda row: row["step"])
  plural = "s" if len(steps) > 1 else ""
  return (f"evaluated {len(steps)} checkpoint{plural} (step{plural} {', '.join(map(str, steps))}) "
          f"in {seconds:.0f} s: {main_metrics(last)} at step {last['step']}; rows in "
          f"{workdir / 'eval_metrics.jsonl'}")
