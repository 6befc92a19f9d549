"""One trainer per workdir (jtl/lock.py): the lock logic in-process, then real trainers racing, and
`kill -9` followed by a rerun."""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jtl import lock as lock_lib
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 600  # outer limit for a trainer's events on a busy machine: the tests wait on events
IN_PROCESS_LIMIT_S = 60  # the same for a thread in this process (a heartbeat every 10 ms)


def wait_until(condition, what, limit=LIMIT_S):
  deadline = time.monotonic() + limit
  while not condition():
    assert time.monotonic() < deadline, f"no {what} within {limit} s"
    time.sleep(0.01)


def dead_pid() -> int:
  """The PID of a process that has exited (and been reaped)."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def write_record(workdir, **fields):
  record = {"host": "somewhere", "pid": 1234, "machine": lock_lib.machine_id(),
            "started": time.time() - 60, "heartbeat": time.time(), "token": "theirs", **fields}
  (workdir / lock_lib.LOCK_FILE).write_text(json.dumps(record))
  return record


def absl_warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---- the lock logic, in-process


def test_first_holds_second_is_refused_with_the_holder_and_the_fix(tmp_path):
  first = lock_lib.WorkdirLock(tmp_path / "run")
  first.acquire()
  try:
    record = json.loads((tmp_path / "run" / lock_lib.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["token"] == first.token
    assert record["host"] and record["heartbeat"] >= record["started"] > 0
    with pytest.raises(ConfigError) as refused:
      lock_lib.WorkdirLock(tmp_path / "run").acquire()
    message = str(refused.value)
    assert f"is in use by another trainer (host {record['host']}, PID {os.getpid()}, since " in message
    assert "--take_over_lock" in message and f"kill {os.getpid()}" in message
    assert "\n" not in message
  finally:
    first.release()
  assert not (tmp_path / "run" / lock_lib.LOCK_FILE).exists()
  second = lock_lib.WorkdirLock(tmp_path / "run")
  second.acquire()  # free again after release
  second.release()


def test_a_dead_holder_on_this_machine_is_taken_over_with_a_warning(tmp_path, caplog):
  write_record(tmp_path, pid=dead_pid())
  with lock_lib.WorkdirLock(tmp_path) as taken:
    assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["token"] == taken.token
  assert any("took over the workdir lock" in w and "no longer runs" in w
             for w in absl_warnings(caplog)), caplog.text


def test_a_live_holder_on_this_machine_is_refused(tmp_path):
  parent = os.getppid()  # alive, not us
  write_record(tmp_path, pid=parent, pid_start=lock_lib.process_start(parent),
               heartbeat=time.time() - 10 * lock_lib.STALE_AFTER_S)  # same machine: the PID decides
  with pytest.raises(ConfigError, match=f"PID {parent}"):
    lock_lib.WorkdirLock(tmp_path).acquire()


def test_a_reused_pid_is_not_the_holder(tmp_path, caplog):
  parent = os.getppid()
  write_record(tmp_path, pid=parent, pid_start="1")  # started at tick 1: another process
  with lock_lib.WorkdirLock(tmp_path):
    pass
  assert any("is now another process" in w for w in absl_warnings(caplog))


def test_another_machine_counts_as_gone_only_once_its_heartbeat_is_stale(tmp_path, caplog):
  write_record(tmp_path, machine="elsewhere", pid=os.getpid(), heartbeat=time.time() - 5)
  with pytest.raises(ConfigError, match="in use by another trainer"):
    lock_lib.WorkdirLock(tmp_path, stale_after=60).acquire()
  write_record(tmp_path, machine="elsewhere", pid=os.getpid(), heartbeat=time.time() - 61)
  with lock_lib.WorkdirLock(tmp_path, stale_after=60):
    pass
  assert any("last heartbeat is 61 s old" in w for w in absl_warnings(caplog)), caplog.text


def test_take_over_takes_a_live_lock(tmp_path, caplog):
  write_record(tmp_path, machine="elsewhere")
  with lock_lib.WorkdirLock(tmp_path, take_over=True) as taken:
    assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["token"] == taken.token
  assert any("--take_over_lock was given" in w for w in absl_warnings(caplog))


def test_an_unreadable_lock_file_is_taken_over(tmp_path):
  (tmp_path / lock_lib.LOCK_FILE).write_text("{not json")
  with lock_lib.WorkdirLock(tmp_path) as taken:
    assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["token"] == taken.token


def test_the_heartbeat_is_refreshed_and_notices_a_lost_lock(tmp_path):
  with lock_lib.WorkdirLock(tmp_path, heartbeat_every=0.01) as held:
    path = tmp_path / lock_lib.LOCK_FILE
    first = json.loads(path.read_text())["heartbeat"]
    wait_until(lambda: json.loads(path.read_text())["heartbeat"] > first, "heartbeat",
               IN_PROCESS_LIMIT_S)

    def steal():  # atomically, and again until noticed (a beat may have read just before)
      (tmp_path / "stolen").write_text(json.dumps({"machine": "elsewhere", "token": "thief"}))
      os.replace(tmp_path / "stolen", path)
      return held.lost_to is not None
    wait_until(steal, "lost-lock notice", IN_PROCESS_LIMIT_S)
    assert held.lost_to["token"] == "thief"
  assert json.loads(path.read_text())["token"] == "thief"  # release leaves another's lock alone


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
@pytest.mark.parametrize("local", [True, False], ids=["local", "remote-protocol"])
def test_racing_acquirers_exactly_one_wins(tmp_path, stale, local):
  """Eight threads at once, on a free workdir or on one whose holder died: one lock, seven refusals.
  `remote-protocol` runs the write-settle-verify path that gs:// uses, on a local folder."""
  if stale:
    write_record(tmp_path, pid=dead_pid())
  locks = [lock_lib.WorkdirLock(tmp_path, settle=0.2) for _ in range(8)]
  for one in locks:
    one.local = local
  start, results = threading.Barrier(len(locks)), {}

  def contend(one):
    start.wait()
    try:
      one.acquire()
      results[one.token] = "held"
    except ConfigError as e:
      results[one.token] = str(e)
  threads = [threading.Thread(target=contend, args=(one,)) for one in locks]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  try:
    winners = [t for t, r in results.items() if r == "held"]
    assert len(winners) == 1, results
    assert all("in use by another trainer" in r for r in results.values() if r != "held"), results
    assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["token"] == winners[0]
  finally:
    for one in locks:
      one.release()


@pytest.mark.parametrize("local", [True, False], ids=["local", "remote-protocol"])
def test_a_stale_lock_is_replaced_only_while_it_is_still_the_stale_one(tmp_path, local):
  """Two restarters read the same stale lock; the second must not replace the first's new one."""
  stale = write_record(tmp_path, pid=dead_pid())
  first, second = (lock_lib.WorkdirLock(tmp_path, settle=0.01) for _ in range(2))
  first.local = second.local = local
  assert first._replace(first.read())
  assert not second._replace(stale)
  assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["token"] == first.token


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_remote_protocol_a_writer_overwritten_within_the_settle_window_backs_off(tmp_path, stale):
  """gs:// has no exclusive create: a trainer whose write was overwritten by a racing trainer's
  before it read back stops with the error naming the racer."""
  if stale:
    write_record(tmp_path, pid=dead_pid())
  racer = lock_lib.WorkdirLock(tmp_path)
  racer.local = False
  racer._settle_wait = lambda: write_record(tmp_path, machine="elsewhere", host="racer", pid=77,
                                            token="racer")
  with pytest.raises(ConfigError, match="in use by another trainer \\(host racer, PID 77"):
    racer.acquire()
  assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["token"] == "racer"


def test_hold_releases_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError):
    with lock_lib.hold(tmp_path):
      assert (tmp_path / lock_lib.LOCK_FILE).exists()
      raise RuntimeError("boom")
  assert not (tmp_path / lock_lib.LOCK_FILE).exists()


def test_hold_releases_on_sigterm_outside_the_loop(tmp_path):
  """SIGTERM during set-up or compilation unwinds (SystemExit 143) through `finally`: lock gone."""
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  with pytest.raises(SystemExit) as exited:
    with lock_lib.hold(tmp_path):
      os.kill(os.getpid(), signal.SIGTERM)
      wait_until(lambda: False, "SIGTERM")  # the handler raises from inside this wait
  assert exited.value.code == 128 + signal.SIGTERM
  assert not (tmp_path / lock_lib.LOCK_FILE).exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_unwritable_workdir_is_one_config_error():
  with pytest.raises(ConfigError, match="cannot write to workdir /proc/jtl_lock"):
    lock_lib.WorkdirLock("/proc/jtl_lock").acquire()


# ---- real trainers

ARGS = ("--config=experiments/configs/pretrain_digits.py", "--config.batch_size=16",
        "--config.log_every=5", "--config.checkpoint_every=5", "--config.optim.warmup_steps=2",
        "--config.model.widths=(8,16)")


def start(workdir, total_steps):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *ARGS,
                           f"--config.total_steps={total_steps}", f"--workdir={workdir}"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def output_of(process):
  return process.communicate(timeout=LIMIT_S)[0]


def steps_logged(workdir):
  return [r["step"] for r in read_jsonl(workdir / "train_metrics.jsonl")]


@pytest.fixture(scope="module")
def dataset_ready():
  from jtl import data
  from tests.helpers import digits_config
  data.validate(digits_config().data)  # prepared once here, not by two racing trainers


@pytest.mark.slow
def test_two_trainers_together_one_runs_then_kill_9_and_rerun_resumes(tmp_path, dataset_ready):
  """Two trainers started at once on one workdir: one runs, the other exits 2 naming it. Then the
  runner is killed with -9 and the same command again takes the lock over and resumes."""
  from jtl import checkpoint
  workdir = tmp_path / "run"
  # Long runs: the winner is still running when the loser reaches the lock.
  trainers = [start(workdir, 100_000), start(workdir, 100_000)]
  try:
    wait_until(lambda: any(p.poll() is not None for p in trainers), "trainer exit")
    loser = next(p for p in trainers if p.poll() is not None)
    winner = next(p for p in trainers if p is not loser)
    loser_output = output_of(loser)
    errors = [line for line in loser_output.splitlines() if line.startswith("error:")]
    assert loser.returncode == 2 and len(errors) == 1, loser_output[-3000:]
    assert f"workdir {workdir} is in use by another trainer (host " in errors[0]
    assert f"PID {winner.pid}, since " in errors[0] and "--take_over_lock" in errors[0]
    wait_until(lambda: len(checkpoint.completed_steps(workdir)) >= 1 or winner.poll() is not None,
               "a checkpoint of the winner")
    assert winner.poll() is None, output_of(winner)[-3000:]
  finally:
    for p in trainers:
      if p.poll() is None:
        p.kill()
        p.communicate()
  left = json.loads((workdir / lock_lib.LOCK_FILE).read_text())
  assert left["pid"] == winner.pid  # kill -9 leaves the lock behind
  resume_from = max(checkpoint.completed_steps(workdir))
  rerun = start(workdir, resume_from + 5)
  output = output_of(rerun)
  assert rerun.returncode == 0, output[-3000:]
  assert "took over the workdir lock" in output and f"PID {winner.pid} no longer runs" in output
  assert f"resumed from step {resume_from}" in output
  # What a run says on the way (tests/test_progress.py): the compilation, start-up notices once.
  assert "compiling the train step (the first step waits for XLA)" in output
  assert "compiled the train step in " in output
  assert output.count("oneDNN custom operations are on") <= 1, output[:3000]
  assert output.count("before absl::InitializeLog() is called") <= 1, output[:3000]
  steps = steps_logged(workdir)
  assert len(steps) == len(set(steps)) and steps == sorted(steps) and steps[-1] == resume_from + 5
  assert not (workdir / lock_lib.LOCK_FILE).exists()
