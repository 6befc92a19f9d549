"""The real preemption path: SIGTERM a running `experiments.train`, run the same command again, and get
params bit-identical to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from jtl import checkpoint, data
from jtl.metric_writer import read_jsonl
from tests.helpers import digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 600  # a few seconds of steps on one CPU device: time enough to be preempted mid-run
# Small and fast; no periodic checkpoints, so the only one before the end is the one the signal writes.
ARGS = ("--config=experiments/configs/pretrain_digits.py", f"--config.total_steps={TOTAL_STEPS}",
        "--config.batch_size=16", "--config.log_every=10", "--config.checkpoint_every=100000",
        "--config.optim.warmup_steps=2")
TIMEOUT_S = 240  # for the whole test: every wait below is bounded by it


def start(workdir):
  """Launches the training command; without the tests' 8 fake devices, so it runs on one."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, deadline):
  """Waits for a run until `deadline` (killing it then); returns its output, asserting exit 0."""
  try:
    output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
    raise AssertionError(f"run timed out:\n{output[-3000:]}")
  assert process.returncode == 0, f"exit {process.returncode}:\n{output[-3000:]}"
  return output


def test_sigterm_then_rerun_gives_bit_identical_params(tmp_path):
  data.validate(digits_config().data)  # builds the embedded dataset here, not in two racing runs
  preempted, straight = tmp_path / "preempted", tmp_path / "straight"
  deadline = time.monotonic() + TIMEOUT_S
  # The uninterrupted reference runs alongside the first attempt of the preempted one.
  first, reference = start(preempted), start(straight)
  processes = [first, reference]
  try:
    # The first metrics line means the loop, and so its signal handler, is running.
    while not read_jsonl(preempted / "train_metrics.jsonl"):
      assert first.poll() is None, f"exited before logging:\n{first.communicate()[0][-3000:]}"
      assert time.monotonic() < deadline, "no metrics line before the timeout"
      time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    output = finish(first, deadline)
    assert "stopped at step" in output, output[-3000:]
    steps = checkpoint.completed_steps(preempted)
    assert len(steps) == 1 and steps[0] < TOTAL_STEPS, (
        f"expected one checkpoint before step {TOTAL_STEPS}, got {steps}: if the run finished before "
        "the signal arrived, raise TOTAL_STEPS")
    processes.append(start(preempted))  # the same command again: resumes and finishes
    output = finish(processes[-1], deadline)
    assert f"resumed from step {steps[0]}" in output, output[-3000:]
    finish(reference, deadline)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()

  resumed_step, resumed = checkpoint.load_variables(preempted)
  straight_step, uninterrupted = checkpoint.load_variables(straight)
  assert resumed_step == straight_step == TOTAL_STEPS
  assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):  # params, batch_stats
    np.testing.assert_array_equal(a, b)
  # The resumed run went on from the checkpoint: no step was logged twice.
  logged = [row["step"] for row in read_jsonl(preempted / "train_metrics.jsonl")]
  assert logged[-1] == TOTAL_STEPS and len(logged) == len(set(logged)), logged
