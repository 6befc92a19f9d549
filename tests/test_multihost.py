"""Multi-host on one machine: two `experiments.train` processes (2 CPU devices each, gloo collectives,
`jax.distributed.initialize` on 127.0.0.1) train to the params of one process with 4 devices on the
same global batch."""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from jtl import checkpoint, data
from jtl.metric_writer import read_jsonl
from tests.helpers import digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 20
ARGS = ("--config=experiments/configs/pretrain_digits.py", f"--config.total_steps={TOTAL_STEPS}",
        "--config.batch_size=16", "--config.log_every=10", "--config.checkpoint_every=100000",
        "--config.optim.warmup_steps=2")
TIMEOUT_S = 240  # for all runs together: a host whose peer died would otherwise wait forever


def start(workdir, devices, *flags):
  """Launches the training command on `devices` fake CPU devices."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def finish_all(processes):
  """Waits for every run, asserting exit 0; on a failure or the timeout, kills those still running."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for name, process in processes.items():
      try:
        output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} still running after {TIMEOUT_S}s") from None
      assert process.returncode == 0, f"{name} exited {process.returncode}:\n{output[-3000:]}"
  finally:
    for process in processes.values():
      if process.poll() is None:
        process.kill()
        process.communicate()


def test_two_processes_train_like_one_with_all_their_devices(tmp_path):
  data.validate(digits_config().data)  # builds the embedded dataset here, not in three racing runs
  multi, single = tmp_path / "multi", tmp_path / "single"
  address = f"127.0.0.1:{free_port()}"
  processes = {f"process {i}": start(multi, 2, f"--coordinator_address={address}",
                                     "--num_processes=2", f"--process_id={i}") for i in range(2)}
  processes["single process"] = start(single, 4)
  finish_all(processes)

  multi_step, multi_vars = checkpoint.load_variables(multi)
  single_step, single_vars = checkpoint.load_variables(single)
  assert multi_step == single_step == TOTAL_STEPS
  assert jax.tree.structure(multi_vars) == jax.tree.structure(single_vars)
  for a, b in zip(jax.tree.leaves(multi_vars), jax.tree.leaves(single_vars)):  # params, batch_stats
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # One line per logged step: only process 0 writes. (Two processes that failed to join would each
  # train alone on the whole batch, matching the params above, but would both write lines.)
  rows = read_jsonl(multi / "train_metrics.jsonl")
  assert [row["step"] for row in rows] == [10, 20], rows
  for a, b in zip(rows, read_jsonl(single / "train_metrics.jsonl")):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
