"""Resuming a run: is the workdir this experiment's, which checkpoint to restore, and what to do when
none reads back (the trainer's side; jtl/keep.py checks and quarantines checkpoints)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from jtl import checkpoint, keep
from jtl import config as config_lib
from jtl.errors import ConfigError


def check_same_experiment(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """ConfigError if the workdir holds checkpoints of a different experiment."""
  if not checkpoint.completed_steps(workdir):
    return
  previous = config_lib.load_run_config(workdir)
  if previous is not None:
    changed = config_lib.differences(previous, config, ignore=config_lib.RESUMABLE_CHANGES,
                                     shared_only=True)
    if changed:
      raise ConfigError(
          f"workdir {workdir} holds checkpoints of a different experiment: {'; '.join(changed[:5])}"
          f"{' ...' if len(changed) > 5 else ''}; use another --workdir, or delete {workdir} to "
          "start fresh")


def newest(config: ml_collections.ConfigDict, workdir: epath.Path, mgr: Any,
           setup_at: Callable[[int], Any]) -> tuple[int, Any, dict[str, Any]] | None:
  """(step, setup, restored items) of the newest checkpoint that reads back and matches its
  checksums; None without one. `setup_at(step)` is the trainer's setup for the phase that wrote
  `step` (its `abstract_state` says what to restore). A broken checkpoint is moved aside with a
  warning and the next older one is tried; one that reads fine but holds another state's arrays is a
  ConfigError."""
  candidates = keep.good_steps(workdir)  # structurally broken ones are moved aside here
  mgr.reload()
  for step in reversed(candidates):
    s = setup_at(step)
    try:
      restored = checkpoint.restore(mgr, step, {
          name: getattr(s.abstract_state, name) for name in checkpoint.ITEMS},
          verify=config.get("checkpoint_checksums", True))
    except Exception as e:  # orbax/tensorstore raise many types
      why = keep.verify(workdir, step)
      if why is None:  # the files read fine: they are another state's, not damaged
        raise ConfigError(f"checkpoint {step} in {workdir} does not fit this run's state "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''});"
                          " use another --workdir, or delete that one to start fresh") from e
      keep.quarantine(workdir, step, why)
      mgr.reload()
      continue
    if not checkpoint.has_manifest(workdir, step):
      logging.warning("checkpoint %d carries no checksums (written with checkpoint_checksums=False "
                      "or by an older jtl): its contents are not verified", step)
    return step, s, restored
  return None


def no_usable_checkpoint(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Called when nothing could be resumed. If damaged checkpoints were moved aside (now or by an
  earlier attempt), starting over would silently throw the run away: a ConfigError says so, unless
  `restart_from_scratch` asks for it, in which case the damaged checkpoints and the metrics files
  move to `WORKDIR/before-restart-<n>/` and the run starts at step 0 in a clean workdir."""
  damaged = keep.quarantined(workdir)
  if not damaged:
    return
  if not config.get("restart_from_scratch", False):
    raise ConfigError(
        f"no usable checkpoint in {checkpoint.checkpoint_dir(workdir)}: every one is damaged and "
        f"moved aside ({', '.join(damaged)}; the warnings above say why); nothing else was changed. "
        "To start over from step 0, rerun with --config.restart_from_scratch=True (the damaged "
        "checkpoints and the metrics files move to before-restart-N in the workdir), or use a new "
        "--workdir")
  aside = keep.set_aside(workdir, damaged, ("train_metrics.jsonl", "eval_metrics.jsonl"))
  logging.warning("restart_from_scratch: no usable checkpoint; %s moved to %s; starting at step 0",
                  ", ".join(damaged), aside)
