"""Real processes, real signals. `kill -9` mid-step, mid-save and right after a save, and a polite
SIGTERM (save and exit 0): the same command again ends bit-identical to an uninterrupted run, every
step logged once. SIGTERM/SIGINT during start-up exit 0; a file-size limit or write access lost
mid-run end with one `error:` line (exit 2) and the rerun carries on. Two hosts (2 processes x 2 devices, gloo) train like one process with 4 devices; one
of them killed stops the other in bounded time, the restarted pair resumes, and two evaluator
processes write each row once."""
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jtl import checkpoint, data
from jtl.metric_writer import read_jsonl
from tests.helpers import digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120  # the signals land by step 32; the rest is the resumed runs
ARGS = ("--config=experiments/configs/pretrain_digits.py", f"--config.total_steps={STEPS}",
        "--config.batch_size=16", "--config.log_every=10", "--config.checkpoint_every=8",
        "--config.optim.warmup_steps=2", "--config.model.widths=(8,16)")
# Only a hang guard: every wait below is for an event (a log row, a checkpoint, an exit), and a busy
# machine may take many times the idle duration to reach it. No assertion is about elapsed time but
# the heartbeat bound docs/reliability.md states.
TIMEOUT_S = 1800
HEARTBEAT_TIMEOUT_S = 10


def start(workdir, *extra, devices=1, module="experiments.train", preexec_fn=None):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  args = ARGS if module == "experiments.train" else ()
  return subprocess.Popen([sys.executable, "-m", module, *args, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, preexec_fn=preexec_fn)


def finish(process, deadline, expect=0):
  try:
    output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
    raise AssertionError(f"still running at the deadline:\n{output[-3000:]}") from None
  if expect is not None:
    assert process.returncode == expect, f"exit {process.returncode}:\n{output[-3000:]}"
  return output


class Lines:
  """A process's output read line by line as it comes, each line with the monotonic time it arrived."""

  def __init__(self, process):
    self.process, self.lines = process, []
    self.thread = threading.Thread(target=self._read, daemon=True)
    self.thread.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append((time.monotonic(), line))

  def first(self, text):
    """The arrival time of the first line containing `text`, or None."""
    return next((t for t, line in self.lines if text in line), None)

  def wait(self, deadline):
    """The whole output once the process has exited (AssertionError at the hang guard)."""
    try:
      self.process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      self.process.kill()
      raise AssertionError("still running at the hang guard:\n" + self.text()[-3000:]) from None
    self.thread.join()
    return self.text()

  def text(self):
    return "".join(line for _, line in self.lines)


def wait_for(condition, process, deadline, what):
  while not condition():
    assert process.poll() is None, f"exited before {what}:\n{process.communicate()[0][-3000:]}"
    assert time.monotonic() < deadline, f"no {what} before the deadline"
    time.sleep(0.002)


def saving(workdir):
  folder = checkpoint.checkpoint_dir(workdir)
  return folder.exists() and any("tmp" in p.name for p in folder.iterdir())


def test_kill_9_anywhere_then_rerun_is_bit_identical(tmp_path):
  data.validate(digits_config().data)  # builds the embedded dataset once, not in racing runs
  deadline = time.monotonic() + TIMEOUT_S
  reference = start(tmp_path / "reference")
  kills = {  # name -> (moment, signal)
      "mid-step": (lambda w: len(read_jsonl(w / "train_metrics.jsonl")) >= 3, signal.SIGKILL),
      "mid-save": (lambda w: len(checkpoint.completed_steps(w)) >= 2 and saving(w), signal.SIGKILL),
      "after-save": (lambda w: len(checkpoint.completed_steps(w)) >= 3, signal.SIGKILL),
      "sigterm": (lambda w: len(read_jsonl(w / "train_metrics.jsonl")) >= 2, signal.SIGTERM),
  }
  processes = [reference]
  try:
    for name, (moment, sig) in kills.items():
      workdir = tmp_path / name
      victim = start(workdir)
      processes.append(victim)
      wait_for(lambda: moment(workdir), victim, deadline, name)
      victim.send_signal(sig)
      output = finish(victim, deadline, expect=0 if sig == signal.SIGTERM else None)
      if sig == signal.SIGTERM:  # preemption: a checkpoint at the current step, then exit 0
        assert "stopped at step" in output, output[-2000:]
      assert checkpoint.completed_steps(workdir)[-1] < STEPS, f"{name}: finished before the signal"
    for name in kills:  # the same command again
      processes.append(start(tmp_path / name))
    outputs = [finish(p, deadline) for p in processes[len(kills) + 1:]]
    finish(reference, deadline)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert all("resumed from step" in out for out in outputs)
  _, expected = checkpoint.load_variables(tmp_path / "reference")
  for name in kills:
    step, got = checkpoint.load_variables(tmp_path / name)
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b, err_msg=name)
    logged = [r["step"] for r in read_jsonl(tmp_path / name / "train_metrics.jsonl")]
    assert logged == list(range(10, STEPS + 1, 10)), (name, logged)  # each step once


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


PAIR_STEPS = 40  # short: two device layouts sum gradients in different orders, and that drifts


def pair(workdir, module="experiments.train"):
  address = f"127.0.0.1:{free_port()}"
  extra = [f"--config.total_steps={PAIR_STEPS}"] if module == "experiments.train" else []
  return [start(workdir, f"--coordinator_address={address}", "--num_processes=2",
                f"--process_id={i}", f"--heartbeat_timeout={HEARTBEAT_TIMEOUT_S}", *extra,
                devices=2, module=module)
          for i in range(2)]


@pytest.mark.slow
def test_two_hosts_train_like_one_a_dead_one_stops_its_peer_and_the_pair_resumes(tmp_path):
  data.validate(digits_config().data)
  workdir = tmp_path / "run"
  deadline = time.monotonic() + TIMEOUT_S
  processes = pair(workdir) + [start(tmp_path / "single", f"--config.total_steps={PAIR_STEPS}",
                                     devices=4)]
  try:
    wait_for(lambda: len(checkpoint.completed_steps(workdir)) >= 1, processes[0], deadline,
             "a checkpoint")
    survivor = Lines(processes[0])  # from here on its output is timed line by line
    processes[1].send_signal(signal.SIGKILL)
    processes[1].communicate()
    killed_at = time.monotonic()  # the peer is dead (reaped) from here
    output = survivor.wait(deadline)
    assert processes[0].returncode != 0, output[-2000:]
    # docs/reliability.md's bound: the survivor stops within --heartbeat_timeout of the peer's death. Its
    # stop is the coordination service's report (the process then aborts); how long the abort and
    # the reading of its output take on a busy machine is not part of the claim.
    noticed = survivor.first("another task died")
    assert noticed is not None, output[-2000:]
    assert noticed - killed_at <= HEARTBEAT_TIMEOUT_S, (noticed - killed_at, output[-2000:])
    restarted = pair(workdir)
    processes += restarted
    outputs = [finish(p, deadline) for p in restarted]
    assert "resumed from step" in outputs[0]
    evaluators = pair(workdir, "experiments.evaluate")
    processes += evaluators
    for p in evaluators:
      finish(p, deadline)
    finish(processes[2], deadline)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()
  evaluated = [r["step"] for r in read_jsonl(workdir / "eval_metrics.jsonl")]
  assert evaluated == sorted(set(evaluated)) and evaluated[-1] == PAIR_STEPS, evaluated
  # Two processes of 2 devices (gloo collectives) end where one process with 4 devices does.
  multi_step, multi = checkpoint.load_variables(workdir)
  single_step, single = checkpoint.load_variables(tmp_path / "single")
  assert multi_step == single_step == PAIR_STEPS
  for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  logged = [r["step"] for r in read_jsonl(workdir / "train_metrics.jsonl")]
  assert logged == list(range(10, PAIR_STEPS + 1, 10)), logged  # process 0 writes, each step once


SHORT = ("--config.total_steps=40", "--config.compilation_cache=none")


def error_lines(output):
  return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_file_size_limit_is_one_error_line_and_the_rerun_finishes(tmp_path):
  """`ulimit -f` (EFBIG) while orbax writes a checkpoint: one `error:` line naming the file and the
  limit, exit 2, and no traceback; the same command without the limit then finishes."""
  data.validate(digits_config().data)
  deadline = time.monotonic() + TIMEOUT_S
  workdir = tmp_path / "run"
  limit = 5 * 1024  # config.json (2.3 KB) fits; the first checkpoint's 6 KB files do not
  process = start(workdir, *SHORT, preexec_fn=lambda: resource.setrlimit(
      resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])))
  output = finish(process, deadline, expect=2)
  errors = error_lines(output)
  assert len(errors) == 1 and "file-size limit" in errors[0] and str(workdir) in errors[0], output
  # Nor orbax's writer threads' "Event loop is closed" at interpreter shutdown: the process ends at
  # the error line (cli._quiet_shutdown).
  assert "Traceback" not in output, output[-3000:]
  assert checkpoint.completed_steps(workdir) == []  # nothing half-written was committed
  finish(start(workdir, *SHORT), deadline)
  assert checkpoint.completed_steps(workdir)[-1] == 40


def _take_write_access(path):
  """Makes `path` and everything under it unwritable, also for root (immutable flag); returns how to
  give it back, or None if this machine cannot."""
  if os.geteuid() != 0:
    subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
    return lambda: subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
  if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode:
    return None
  return lambda: subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


@pytest.mark.slow
def test_write_permission_lost_mid_run_is_one_error_line_and_the_rerun_resumes(tmp_path):
  data.validate(digits_config().data)
  deadline = time.monotonic() + TIMEOUT_S
  workdir = tmp_path / "run"
  process = start(workdir, "--config.compilation_cache=none")
  try:
    wait_for(lambda: len(checkpoint.completed_steps(workdir)) >= 1, process, deadline,
             "a checkpoint")
    give_back = _take_write_access(workdir)
    if give_back is None:
      pytest.skip("cannot take write access away here (root without CAP_LINUX_IMMUTABLE)")
    try:
      output = finish(process, deadline, expect=2)
    finally:
      give_back()
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  errors = error_lines(output)
  assert len(errors) == 1 and str(workdir) in errors[0], (errors, output[-3000:])
  assert "permission" in errors[0] or "not permitted" in errors[0], errors
  assert "Traceback" not in output, output[-3000:]
  resumed = finish(start(workdir, "--config.compilation_cache=none"), deadline)
  assert "resumed from step" in resumed
  assert checkpoint.completed_steps(workdir)[-1] == STEPS


@pytest.mark.slow
def test_sigterm_or_sigint_during_start_up_exits_0(tmp_path):
  """While Python imports jax (SIGTERM) and after the run is set up (SIGINT, once config.json is
  written: restore and compilation): exit 0, no traceback; rerunning trains normally."""
  data.validate(digits_config().data)
  deadline = time.monotonic() + TIMEOUT_S
  early = start(tmp_path / "early", *SHORT)
  time.sleep(1.0)
  assert early.poll() is None
  early.send_signal(signal.SIGTERM)
  late = start(tmp_path / "late", *SHORT)
  wait_for(lambda: (tmp_path / "late" / "config.json").exists(), late, deadline, "config.json")
  late.send_signal(signal.SIGINT)
  for process in (early, late):
    output = finish(process, deadline, expect=0)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
  assert checkpoint.completed_steps(tmp_path / "late") in ([], [8], [8, 16])  # (if it got that far)
  finish(start(tmp_path / "early", *SHORT), deadline)
  assert checkpoint.completed_steps(tmp_path / "early")[-1] == 40
