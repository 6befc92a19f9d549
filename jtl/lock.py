"""One trainer per workdir: `WORKDIR/trainer.lock`, created atomically, kept alive by a heartbeat.

Two trainers writing one workdir (a scheduler that restarts a job whose first copy still runs) end in
orbax "step already exists" tracebacks and duplicate metric rows. The first trainer creates
`trainer.lock` (JSON: host, PID, start time, heartbeat, a random token) before it writes anything
else; a second one finds it and stops with one `error:` line naming the holder and how to take over.

The holder is *gone*, and its lock is taken over with a warning, when
* it ran on this machine (same host name, boot id and PID namespace) and its PID no longer runs, or
  now belongs to another process (different start time) — so `kill -9` and a rerun just work;
* it ran elsewhere and its heartbeat (refreshed every `heartbeat_every` seconds by a daemon thread)
  is older than `stale_after` seconds — a holder on another machine killed with `kill -9` blocks the
  workdir for at most that long;
* or the user says so: `python -m experiments.train ... --take_over_lock` (or deleting the file).

Creating the file:
* local paths: write a private temporary file, then `os.link` it to `trainer.lock`. `link` fails if
  the name exists, atomically (like O_EXCL, also on NFSv3+), and readers never see a half-written
  lock. A stale lock is replaced under a short-lived `trainer.lock.takeover` guard (O_EXCL), after
  checking it is still the same stale lock.
* remote paths (`gs://...` through etils.epath): there is no exclusive create in epath, so it is
  check → write → wait `settle` seconds → read back. Object writes are whole and reads strongly
  consistent on GCS, so of two trainers racing within the settle window the last writer's token is
  what both read back and the other stops. Two writers whose check-to-write gaps straddle the whole
  window could both win; the heartbeat thread notices it lost the lock and says so loudly.

Multi-host runs: process 0 holds the one lock of the job (`hold`); the others learn its outcome by a
broadcast and stop with it. The evaluator never takes this lock.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

from jtl.errors import ConfigError

LOCK_FILE = "trainer.lock"
HEARTBEAT_EVERY_S = 15.0
STALE_AFTER_S = 120.0  # a heartbeat this old (holder on another machine) means the holder is gone
REMOTE_SETTLE_S = 2.0
_GUARD_STALE_S = 30.0  # a takeover guard lives for milliseconds; one this old was left by a crash
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_held_here: set[str] = set()  # tokens of the locks this process holds (in-process callers, threads)


def _read_first_line(path: str) -> str:
  try:
    with open(path) as f:
      return f.readline().strip()
  except OSError:
    return ""


def machine_id() -> str:
  """Host name, boot id and PID namespace: two processes with equal ids see each other's PIDs."""
  try:
    namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    namespace = ""
  return f"{socket.gethostname()}/{_read_first_line('/proc/sys/kernel/random/boot_id')}/{namespace}"


def process_start(pid: int) -> str | None:
  """The start time of `pid` in clock ticks since boot (Linux), to tell a reused PID apart."""
  stat = _read_first_line(f"/proc/{pid}/stat")
  if not stat:
    return None
  return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name may hold spaces


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M:%S UTC")


def describe(record: dict[str, Any], now: float | None = None) -> str:
  """'host h, PID n, since 2026-... UTC, last heartbeat 3 s ago' for messages."""
  now = time.time() if now is None else now
  parts = [f"host {record.get('host', '?')}", f"PID {record.get('pid', '?')}"]
  if isinstance(record.get("started"), (int, float)):
    parts.append(f"since {_utc(record['started'])}")
  if isinstance(record.get("heartbeat"), (int, float)):
    parts.append(f"last heartbeat {max(now - record['heartbeat'], 0):.0f} s ago")
  return ", ".join(parts)


def why_gone(record: dict[str, Any], *, stale_after: float = STALE_AFTER_S,
             now: float | None = None) -> str | None:
  """Why the holder described by `record` no longer holds its lock, or None if it may be alive."""
  now = time.time() if now is None else now
  if not record:
    return "the lock file is unreadable"
  pid = record.get("pid")
  if record.get("machine") == machine_id() and isinstance(pid, int):
    if record.get("token") in _held_here:
      return None  # this very process holds it (another train() call in a thread)
    if pid == os.getpid():
      return f"PID {pid} is this process, which does not hold it (a previous run in this container)"
    if not pid_alive(pid):
      return f"PID {pid} no longer runs on {record.get('host')}"
    start = process_start(pid)
    if start is not None and record.get("pid_start") not in (None, start):
      return f"PID {pid} on {record.get('host')} is now another process"
    return None
  heartbeat = record.get("heartbeat")
  if not isinstance(heartbeat, (int, float)):
    return "the lock file has no heartbeat"
  if now - heartbeat > stale_after:
    return f"its last heartbeat is {now - heartbeat:.0f} s old (> {stale_after:.0f} s)"
  return None


def _parse(text: str) -> dict[str, Any]:
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


class WorkdirLock:
  """The lock of one workdir, held by this process between `acquire()` and `release()`."""

  def __init__(self, workdir: str | os.PathLike, *, take_over: bool = False,
               heartbeat_every: float = HEARTBEAT_EVERY_S, stale_after: float = STALE_AFTER_S,
               settle: float = REMOTE_SETTLE_S):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.local = not _REMOTE.match(os.fspath(workdir))
    self.take_over = take_over
    self.heartbeat_every, self.stale_after, self.settle = heartbeat_every, stale_after, settle
    self.token = uuid.uuid4().hex
    self.lost_to: dict[str, Any] | None = None  # set by the heartbeat if another took it over
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._held = False

  # ---- the record and the file operations (local: atomic link/replace; remote: write + verify)

  def _record(self, started: float | None = None) -> str:
    now = time.time()
    return json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "machine": machine_id(),
        "pid_start": process_start(os.getpid()), "started": started or now, "heartbeat": now,
        "token": self.token, "command": " ".join(sys.argv)[:1000]}, indent=1)

  def read(self) -> dict[str, Any] | None:
    """The lock file's record; None if there is none ({} if unreadable)."""
    try:
      return _parse(self.path.read_text())
    except FileNotFoundError:
      return None

  def _private_tmp(self, text: str) -> str:
    tmp = os.fspath(self.path) + f".{self.token}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return tmp

  def _create(self) -> bool:
    """Creates the lock file with this process's record iff there is none (see module docstring)."""
    text = self._record()
    if self.local:
      tmp = self._private_tmp(text)
      try:
        os.link(tmp, os.fspath(self.path))
        return True
      except FileExistsError:
        return False
      finally:
        os.unlink(tmp)
    if self.path.exists():
      return False
    self.path.write_text(text)
    return self._verify_after_settle()

  def _verify_after_settle(self) -> bool:
    self._settle_wait()
    return (self.read() or {}).get("token") == self.token

  def _settle_wait(self) -> None:
    time.sleep(self.settle)  # let a racing writer's object land before we read back

  def _replace(self, stale: dict[str, Any]) -> bool:
    """Replaces the lock file iff it still holds `stale` (so two restarters do not both win)."""
    if not self.local:
      if (self.read() or {}).get("token") != stale.get("token"):
        return False
      self.path.write_text(self._record())
      return self._verify_after_settle()
    guard = os.fspath(self.path) + ".takeover"
    try:
      os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
      with contextlib.suppress(OSError):
        if time.time() - os.path.getmtime(guard) > _GUARD_STALE_S:
          os.unlink(guard)
      return False
    try:
      if self.read() != stale:
        return False
      os.replace(self._private_tmp(self._record()), os.fspath(self.path))
      return True
    finally:
      os.unlink(guard)

  def _refresh(self, started: float) -> None:
    text = self._record(started)
    if self.local:
      os.replace(self._private_tmp(text), os.fspath(self.path))
    else:
      self.path.write_text(text)

  # ---- acquire, heartbeat, release

  def held_message(self, record: dict[str, Any]) -> str:
    pid, host = record.get("pid", "?"), record.get("host", "?")
    return (f"workdir {self.workdir} is in use by another trainer ({describe(record)}); wait for it "
            f"to finish, or stop it (kill {pid} on {host}) and rerun; if you are sure it is gone, "
            f"rerun with --take_over_lock (or delete {self.path})")

  def acquire(self, attempts: int = 50) -> None:
    """Takes the lock (taking over a gone holder's with a warning); ConfigError if it is held."""
    _held_here.add(self.token)  # before it is written: a thread that reads it must see it held
    try:
      self._acquire(attempts)
    except BaseException:
      _held_here.discard(self.token)
      raise
    self._held = True
    started = time.time()
    self._thread = threading.Thread(target=self._beat, args=(started,), daemon=True,
                                    name="jtl-workdir-lock-heartbeat")
    self._thread.start()

  def _acquire(self, attempts: int) -> None:
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      created = self._create()
    except OSError as e:
      raise ConfigError(f"cannot write to workdir {self.workdir} ({e.strerror or e}); choose a "
                        "writable --workdir") from e
    for _ in range(attempts):
      if created:
        break
      record = self.read()
      if record is None:  # released between our create and read: try again
        created = self._create()
        continue
      why = "--take_over_lock was given" if self.take_over else why_gone(
          record, stale_after=self.stale_after)
      if why is None:
        raise ConfigError(self.held_message(record))
      if self._replace(record):
        logging.warning("took over the workdir lock %s from %s: %s", self.path, describe(record),
                        why)
        break
      time.sleep(0.1)  # another restarter is replacing it right now: look again
      created = self._create()
    else:
      raise ConfigError(f"could not take the workdir lock {self.path}: other trainers keep "
                        "taking it; start one trainer per --workdir")

  def _beat(self, started: float) -> None:
    while not self._stop.wait(self.heartbeat_every):
      try:
        record = self.read()
        if record == {}:  # unreadable: someone is writing it by hand; look again at the next beat
          continue
        if (record or {}).get("token") != self.token:  # taken over, or deleted to take it over
          self.lost_to = record or {}
          logging.error("the workdir lock %s was taken over by %s: another trainer may now write "
                        "to this workdir; stop one of them", self.path, describe(record or {}))
          return
        self._refresh(started)
      except OSError as e:  # a storage hiccup: try again at the next beat
        logging.warning("could not refresh the workdir lock %s (%s)", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock file if it is still this process's. Idempotent."""
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    _held_here.discard(self.token)
    with contextlib.suppress(OSError):
      if (self.read() or {}).get("token") == self.token:
        self.path.unlink()

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def live_holder(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The record of the trainer holding `workdir`'s lock if it looks alive, else None. Reads only:
  the evaluator uses it to say whether a trainer is still coming."""
  try:
    record = WorkdirLock(workdir).read()
  except OSError:
    return None
  return record if record is not None and why_gone(record) is None else None


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
  """While held outside the training loop (set-up, compilation, the final save), SIGTERM would kill
  the process without running `finally`: make it raise SystemExit instead, so the lock is released.
  The loop installs its own handler (save, then stop) and gives this one back afterwards."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def unwind(signum, frame):
    del frame
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, unwind)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, take_over: bool = False) -> Iterator[WorkdirLock | None]:
  """The job's lock on `workdir` for the `with` body: process 0 holds it, every process stops with
  a ConfigError if it could not be had. Released on return, on an exception and on SIGTERM."""
  import jax  # here, so that the lock logic itself imports without jax
  lock = WorkdirLock(workdir, take_over=take_over) if jax.process_index() == 0 else None
  error = ""
  if lock is not None:
    try:
      lock.acquire()
    except ConfigError as e:
      error = str(e)
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if int(failed) and not error:
      error = (f"process 0 could not take the workdir lock of {workdir} (its error line says "
               "why)")
  if error:
    raise ConfigError(error)
  try:
    with _sigterm_unwinds():
      yield lock
  finally:
    if lock is not None:
      lock.release()
