"""The training loop: steps, metric windows, checkpoints, stop signals and the non-finite guard.

The step is never made to wait on the host: its metrics stay device arrays in a window that is fetched
when it is logged and before every checkpoint. The host, though, waits for the step it dispatched
`STEPS_IN_FLIGHT` steps earlier: a stop signal (preemption) is acted on once the steps already queued
have run, a few steps' time, not after up to `log_every` of them (minutes of slow steps, past a
preemption's grace period). A fetched window is checked for non-finite values, so a
NaN/Inf loss is caught before the state it produced could be saved: the run stops with the step and
the metrics that went non-finite, and the last checkpoint on disk is the last good one. With
`skip_nonfinite_updates = N`, the step itself refuses such updates (parameters, optimizer and model
state unchanged; `skipped` = 1 in its metrics) and the run stops only after N in a row.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jtl import keep, signals
from jtl.errors import NonFiniteError
from jtl.metric_writer import MetricWriter

STEPS_IN_FLIGHT = 2  # dispatched steps the host may run ahead of the devices (keeps them busy)


class StopFlag:
  """SIGTERM/SIGINT (preemption, Ctrl-C) seen by the loop: it saves a checkpoint and exits cleanly.
  The handler itself is `jtl.signals` (installed from the start of a run, not only in the loop)."""

  def __init__(self, sync_every: int):
    self.sync_every = sync_every

  @property
  def requested(self) -> bool:
    return signals.requested()

  def install(self) -> None:
    signals.install()

  def uninstall(self) -> None:
    """Gives the signals back to whoever handled them before (a caller's own handler, or Python's)."""
    signals.uninstall()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    # All hosts must agree, or the save would hang; agreeing costs a sync, so only now and then.
    if multihost_utils.reached_preemption_sync_point(step):
      return True
    if step % self.sync_every:
      return False
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


class Window:
  """Per-step metrics since the last log line; fetched from the devices only when checked."""

  def __init__(self, max_skipped: int, resumed_from: int | None = None):
    self.max_skipped = max_skipped
    self.resumed_from = resumed_from  # the checkpoint this run started from, if any
    self.pending: list[tuple[int, dict]] = []  # (step, device metrics), not yet checked
    self.checked: list[tuple[int, dict]] = []  # (step, host metrics)
    self.skipped_in_a_row = 0

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def check(self, last_good: int | None, verified: bool = True) -> None:
    """Fetches pending metrics; NonFiniteError at the first non-finite step (or skip streak).
    `last_good`: the newest checkpoint on disk; `verified`: whether it carries checksums."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    for (step, _), metrics in zip(self.pending, fetched):
      if self.max_skipped:
        skipped = bool(metrics.get("skipped", 0))
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row >= self.max_skipped:
          raise NonFiniteError(
              f"{self.skipped_in_a_row} updates in a row had non-finite values, the last at step "
              f"{step}; stopped (skip_nonfinite_updates={self.max_skipped}); "
              f"{self._advice(step - self.skipped_in_a_row + 1, last_good, verified)}")
      else:
        bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
        if bad:
          values = ", ".join(f"{k}={np.asarray(metrics[k]).item():.4g}" for k in bad)
          raise NonFiniteError(f"non-finite values at step {step} ({values}); stopped before saving "
                               f"anything from it; {self._advice(step, last_good, verified)}")
    self.checked += [(step, m) for (step, _), m in zip(self.pending, fetched)]
    self.pending = []

  def means(self) -> dict[str, float]:
    """Means over the checked steps that were not skipped (`skipped`: how many were), then an empty
    window."""
    rows = [m for _, m in self.checked]
    used = [r for r in rows if not r.get("skipped", 0)]
    out = {k: float(np.mean([r[k] for r in used])) if used else float("nan") for k in rows[0]}
    if "skipped" in out:
      out["skipped"] = float(sum(r["skipped"] for r in rows))
    self.checked = []
    return out


  def _advice(self, first_bad: int, last_good: int | None, verified: bool) -> str:
    """What is kept and what to do. A checkpoint is called good only if its checksums vouch for it;
    if the very first step after resuming went bad, the checkpoint itself is the suspect."""
    if last_good is None:
      return ("no checkpoint was written; lower optim.lr, clip gradients (optim.clip_norm), or skip "
              "such updates (--config.skip_nonfinite_updates=N)")
    checked = ("its files match their checksums, so the values were saved like this"
               if verified else "it carries no checksums, so it is unverified")
    if self.resumed_from is not None and first_bad == self.resumed_from + 1 == last_good + 1:
      return (f"that was the first step after resuming from checkpoint {last_good}, which may itself "
              f"hold bad values ({checked}); rerunning resumes from it and fails the same way: "
              f"evaluate it, or move checkpoints/{last_good} aside so that the one before it is used")
    where = (f"the last good checkpoint is step {last_good}" if verified else
             f"the last checkpoint is step {last_good} ({checked})")
    return (f"{where} (rerunning resumes from it); lower optim.lr, clip gradients "
            "(optim.clip_norm), or skip such updates (--config.skip_nonfinite_updates=N)")


def run(config: Any, state: Any, step_fn: Callable, device_batches: Iterator[Any],
        writer: MetricWriter, until: int, keeper: keep.Keeper,
        resumed_from: int | None = None) -> Any:
  """Steps until `until` or a stop signal; logs every `log_every`, checkpoints every
  `checkpoint_every`, at `total_steps` and on a signal (a signal that came before the first step
  stops it before stepping: the state it started from is on disk already, or is the init). Returns
  the state (its step < `until` if a signal stopped it)."""
  stop = StopFlag(sync_every=config.log_every)
  step = first_step = int(state.step)
  window = Window(int(config.get("skip_nonfinite_updates") or 0), resumed_from)
  last_time, last_step = time.perf_counter(), step
  in_flight: collections.deque[dict] = collections.deque()
  stop.install()
  try:
    if jax.process_count() == 1 and stop.requested:
      logging.warning("stopped at step %d after a signal, before any step; resume by running the "
                      "same command", step)
      return state
    while step < until:
      state, metrics = step_fn(state, next(device_batches))
      step += 1
      window.add(step, metrics)  # device arrays: no sync per step
      in_flight.append(metrics)
      if len(in_flight) > STEPS_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      log_now = step % config.log_every == 0 or step == until
      if step == first_step + 1 and not log_now:  # its call compiled the step: steps/s and the ETA
        last_time, last_step = time.perf_counter(), step  # count from here, not from the compilation
      if log_now:
        window.check(*keeper.last_good_info())
        means = window.means()
        now = time.perf_counter()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        means["steps_per_sec"] = rate
        logging.info("step %d/%d %s | %.1f steps/s, ETA %.0fs", step, config.total_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in means.items() if k != "steps_per_sec"),
                     rate, (config.total_steps - step) / max(rate, 1e-9))
        writer.write(step, means)
        last_time, last_step = now, step
      stopping = stop.should_stop(step)
      if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
        window.check(*keeper.last_good_info())  # never save a state that came from a non-finite step
        keeper.save(step, state)
      if stopping:
        logging.warning("stopped at step %d after a signal; resume by running the same command",
                        step)
        break
  finally:
    stop.uninstall()
  return state
