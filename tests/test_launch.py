"""`--distributed` under a simulated SLURM job step: the variables `srun` sets for two tasks on one
node, two processes on localhost, and JAX's own SLURM detection (no coordinator flags) forms the job."""
import os
import socket
import subprocess
import sys
import time

import pytest

from jtl import checkpoint
from jtl.metric_writer import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ("--config=experiments/configs/pretrain_digits.py", "--config.total_steps=10",
        "--config.batch_size=16", "--config.log_every=5", "--config.checkpoint_every=10",
        "--config.optim.warmup_steps=2", "--config.model.widths=(8,16)")


def slurm_job_id_with_free_port() -> int:
  """A job id whose coordinator port (JAX: 61440 + id mod 4096) is free here."""
  for job_id in range(4242, 4242 + 4096, 37):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job_id % 4096))
        return job_id
      except OSError:
        continue
  raise AssertionError("no free port in JAX's SLURM range")


@pytest.mark.slow
def test_distributed_detects_a_slurm_job_step(tmp_path):
  job_id = slurm_job_id_with_free_port()
  processes = []
  for task in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT,
           # what srun sets for task `task` of `srun --nodes=1 --ntasks=2` on node "localhost"
           "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
           "SLURM_NTASKS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
           "SLURM_STEP_NUM_NODES": "1"}
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *ARGS, "--distributed",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  deadline = time.monotonic() + 300
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
      assert p.returncode == 0, outputs[-1][-3000:]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for task, output in enumerate(outputs):
    assert f"distributed: process {task} of 2, 2 local of 4 devices" in output, output[-3000:]
  assert checkpoint.completed_steps(tmp_path / "run") == [10]
  assert [r["step"] for r in read_jsonl(tmp_path / "run" / "train_metrics.jsonl")] == [5, 10]
