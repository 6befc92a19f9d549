"""Which checkpoints a run keeps: integrity checks, quarantine of broken ones, and the keep policy.

* **Integrity.** `problem(workdir, step)` is a structural check (metadata that parses, every item folder
  with its metadata and non-empty files); `verify` also checks the files against the checkpoint's
  checksum manifest (`jtl.checkpoint`) and reads it back to the host. A broken
  checkpoint is never deleted and never used: it is moved aside to `checkpoints/corrupt-<step>` with a
  warning naming it, so resuming falls back to the newest good one and the evaluator skips it.
* **Keep policy.** Orbax's own `max_to_keep` would delete old checkpoints when a new one is written,
  before anyone knows the new one is readable. Here the run keeps the newest `keep_checkpoints`
  checkpoints that are good — the newest is read back (`checkpoint_verify`) before any older one is
  deleted — so a bad checkpoint never costs the last good one.
* **A watching evaluator** (`experiments.evaluate --watch`) writes `WORKDIR/evaluator.json` (the last
  step it evaluated and a heartbeat). While its heartbeat is fresh, checkpoints it has not evaluated yet
  are kept too, up to `max_unevaluated` of them (a warning names what is dropped when it falls further
  behind), so a learning curve gets every point. It registers before anything else (`register_evaluator`,
  before its own set-up), so a trainer started in the same second deletes nothing it will want, and
  when it is done with a finished run it deletes what was kept only for it (`catch_up`).
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jtl import checkpoint, remote

EVALUATOR_FILE = "evaluator.json"
HEARTBEAT_FRESH_S = 600.0  # an evaluator silent for longer is taken to be gone


def problem(workdir: str | epath.Path, step: int) -> str | None:
  """Why checkpoint `step` is structurally broken, or None if it looks whole."""
  folder = checkpoint.checkpoint_dir(workdir) / str(step)
  try:
    meta = json.loads((folder / "_CHECKPOINT_METADATA").read_text())
    items = list(meta.get("item_handlers") or [])
    if "params" not in items:
      return "its metadata lists no params item"
    sizes = remote.file_sizes(folder)  # (one listing of the whole checkpoint: cheap on gs://)
    for item in items:
      inside = sorted((rel, size) for rel, size in sizes.items() if rel.startswith(f"{item}/"))
      if not inside:
        return f"item folder {item} is missing"
      json.loads((folder / item / "_METADATA").read_text())
      empty = [rel.rsplit("/", 1)[-1] for rel, size in inside
               if size == 0 and not rel.endswith("/commit_success.txt")]
      if empty:
        return f"{item}/{empty[0]} is empty"
  except FileNotFoundError as e:
    return f"{e.filename or e} is missing"
  except (ValueError, OSError) as e:  # garbage metadata, unreadable files
    return f"unreadable metadata ({str(e).splitlines()[0][:120]})"
  return None


def verify(workdir: str | epath.Path, step: int) -> str | None:
  """Why checkpoint `step` is damaged (structure, then its checksum manifest if it has one) or cannot
  be read back (every item, onto one host device), or None."""
  why = problem(workdir, step) or checkpoint.checksum_problem(workdir, step)
  if why:
    return why
  folder = checkpoint.checkpoint_dir(workdir) / str(step)
  items = [n for n in checkpoint.ITEMS if (folder / n).exists()]
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  args = ocp.args.Composite(
      **{n: ocp.args.StandardRestore(fallback_sharding=one_device) for n in items})
  with checkpoint.manager(workdir, keep=None, async_save=False, create=False) as reader:
    try:
      out = reader.restore(step, args=args)
      jax.block_until_ready([out[n] for n in items])
    except Exception as e:  # orbax/tensorstore raise many types for a damaged file
      return (f"cannot be read back ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160] if str(e) else ''})")
  return None


def quarantine(workdir: str | epath.Path, step: int, why: str) -> None:
  """Moves a broken checkpoint aside (to `checkpoints/corrupt-<step>`), with a warning naming it."""
  folder = checkpoint.checkpoint_dir(workdir)
  target = folder / f"corrupt-{step}"
  n = 1
  while target.exists():
    target, n = folder / f"corrupt-{step}-{n}", n + 1
  logging.warning("checkpoint %s is broken: %s; moved to %s and not used", folder / str(step), why,
                  target)
  if jax.process_index() == 0:
    (folder / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jtl_quarantine_{step}")


def quarantined(workdir: str | epath.Path) -> list[str]:
  """Names of the checkpoints moved aside as broken (`corrupt-<step>[-n]`), oldest step first."""
  folder = checkpoint.checkpoint_dir(workdir)
  if not folder.exists():
    return []
  names = [p.name for p in folder.iterdir() if p.name.startswith("corrupt-")]
  return sorted(names, key=lambda n: [int(x) if x.isdigit() else x for x in n.split("-")[1:]])


def set_aside(workdir: str | epath.Path, checkpoints: list[str], files: tuple[str, ...]
              ) -> epath.Path:
  """Moves the named checkpoint folders and workdir files into a new `before-restart-<n>` folder
  (process 0; every process waits); returns it. Nothing is deleted."""
  workdir = epath.Path(workdir)
  n = 1
  while (workdir / f"before-restart-{n}").exists():
    n += 1
  target = workdir / f"before-restart-{n}"
  if jax.process_index() == 0:
    (target / "checkpoints").mkdir(parents=True)
    for name in checkpoints:
      (checkpoint.checkpoint_dir(workdir) / name).rename(target / "checkpoints" / name)
    for name in files:
      if (workdir / name).exists():
        (workdir / name).rename(target / name)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jtl_set_aside")
  return target


def good_steps(workdir: str | epath.Path) -> list[int]:
  """Completed steps that pass the structural check (broken ones are quarantined on the way)."""
  out = []
  for step in checkpoint.completed_steps(workdir):
    why = problem(workdir, step)
    if why and not (checkpoint.checkpoint_dir(workdir) / str(step)).exists():
      continue  # deleted meanwhile (a finished evaluator's catch-up): gone, not broken
    if why:
      quarantine(workdir, step, why)
    else:
      out.append(step)
  return out


def delete(mgr: ocp.CheckpointManager, workdir: str | epath.Path, step: int,
           attempts: int = 3) -> None:
  """Deletes checkpoint `step`, while another process may be deleting it too (a finished
  evaluator's catch-up and the trainer's last prune). On a local disk the loser gets
  FileNotFoundError (or orbax's ValueError for a step it no longer lists). On `gs://` a folder is
  deleted object by object, and TensorFlow's recursive delete fails ("could not fully delete dir")
  when the other process took some of the objects first: the step is gone (or is tried again)
  rather than an error."""
  for attempt in range(attempts):
    try:
      mgr.delete(step)
      return
    except (FileNotFoundError, ValueError):
      return
    except Exception:  # pylint: disable=broad-except  (TensorFlow's PermissionDeniedError, ...)
      if not (checkpoint.checkpoint_dir(workdir) / str(step)).exists():
        return
      if attempt == attempts - 1:
        raise


def evaluator_progress(workdir: str | epath.Path) -> int | None:
  """The last step a live watching evaluator reported as evaluated (-1: none yet); None if no
  evaluator is watching (no file, or a stale heartbeat)."""
  path = epath.Path(workdir) / EVALUATOR_FILE
  try:
    info = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None
  if time.time() - float(info.get("heartbeat", 0)) > HEARTBEAT_FRESH_S:
    return None
  return int(info.get("evaluated", -1))


def register_evaluator(workdir: str | epath.Path) -> None:
  """A watching evaluator's first act (before any set-up): its progress so far (the steps already in
  `eval_metrics.jsonl`; -1 if none) and a heartbeat, so the keep policy keeps every checkpoint it has
  not evaluated from the start. Creates the workdir if the trainer has not yet."""
  from jtl.metric_writer import read_jsonl  # pylint: disable=g-import-not-at-top  (no cycle)
  workdir = epath.Path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  done = [row["step"] for row in read_jsonl(workdir / "eval_metrics.jsonl")]
  report_evaluator_progress(workdir, max(done, default=-1))


def catch_up(workdir: str | epath.Path, keep: int | None, evaluated: set[int]) -> None:
  """After a watching evaluator is done with a finished run: deletes the checkpoints the trainer's
  keep policy kept only for it (evaluated, older than the newest `keep` good ones). Nothing that was
  not evaluated, nothing damaged, nothing if `keep` is None."""
  if keep is None:
    return
  good = [s for s in checkpoint.completed_steps(workdir) if not problem(workdir, s)]
  doomed = [s for s in good[:-keep] if s in evaluated]
  if not doomed:
    return
  with checkpoint.manager(workdir, keep=None, async_save=False, create=False) as mgr:
    for step in doomed:
      delete(mgr, workdir, step)  # (the trainer's own pruning may get there first)
  logging.info("the evaluator is done: deleted checkpoints %s (keep_checkpoints=%d)", doomed, keep)


def report_evaluator_progress(workdir: str | epath.Path, evaluated: int) -> None:
  """Written by a watching evaluator (process 0), atomically: its progress and a heartbeat."""
  path = epath.Path(workdir) / EVALUATOR_FILE
  if jax.process_index() or not path.parent.exists():
    return
  tmp = path.parent / f".{EVALUATOR_FILE}.tmp"
  tmp.write_text(json.dumps({"evaluated": evaluated, "heartbeat": time.time()}))
  tmp.replace(path)


class Keeper:
  """The keep policy of one run (see the module docstring)."""

  def __init__(self, mgr: ocp.CheckpointManager, workdir: str | epath.Path, keep: int | None,
               verify_newest: bool = True, max_unevaluated: int = 50):
    self.mgr, self.workdir, self.keep, self.verify_newest = mgr, workdir, keep, verify_newest
    self.max_unevaluated = max_unevaluated
    self._verified: set[int] = set()

  def last_good(self) -> int | None:
    """The newest checkpoint on disk that looks whole (after any save in flight completes)."""
    self.mgr.wait_until_finished()
    steps = [s for s in checkpoint.completed_steps(self.workdir) if not problem(self.workdir, s)]
    return steps[-1] if steps else None

  def last_good_info(self) -> tuple[int | None, bool]:
    """(`last_good()`, whether it carries a checksum manifest)."""
    step = self.last_good()
    return step, step is not None and checkpoint.has_manifest(self.workdir, step)

  def save(self, step: int, state: Any) -> None:
    """Prunes once the previous (asynchronous) save is complete, then saves `step`."""
    self.mgr.wait_until_finished()
    self.prune()
    checkpoint.save(self.mgr, step, state, force=True)

  def finish(self) -> None:
    self.mgr.wait_until_finished()
    self.prune()

  def prune(self) -> None:
    mgr = self.mgr
    if self.keep is None:
      return
    good = good_steps(self.workdir)
    while good and self.verify_newest and good[-1] not in self._verified:
      why = verify(self.workdir, good[-1])
      if not why:
        self._verified.add(good[-1])
        break
      quarantine(self.workdir, good.pop(), why)
    keep = set(good[-self.keep:])
    evaluated = evaluator_progress(self.workdir)
    if evaluated is not None:
      waiting = [s for s in good if s > evaluated and s not in keep]
      if len(waiting) > self.max_unevaluated:
        dropped = waiting[:len(waiting) - self.max_unevaluated]
        logging.warning("the watching evaluator is %d checkpoints behind; deleting unevaluated "
                        "checkpoints %s", len(waiting), dropped)
        waiting = waiting[len(dropped):]
      keep |= set(waiting)
    doomed = [s for s in good if s not in keep]
    if jax.process_count() > 1:  # every process deletes the same steps
      doomed = [int(s) for s in multihost_utils.broadcast_one_to_all(
          np.asarray(doomed + [-1] * (len(good) - len(doomed)), np.int64)) if s >= 0]
    for step in doomed:
      delete(mgr, self.workdir, step)  # (a finished evaluator's catch-up may get there first)
    try:
      mgr.reload()
    except FileNotFoundError:  # (the same: a step that vanished while orbax listed it)
      mgr.reload()
