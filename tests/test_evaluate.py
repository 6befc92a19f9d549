"""Checkpoint-based evaluation: every checkpoint exactly once, numbers equal to in-process evaluation."""
import contextlib
import io
import os
import threading

import jax
import ml_collections
import numpy as np

from experiments import cli
from experiments import evaluate as evaluate_entry
from jtl import checkpoint, data, evaluate, train
from jtl.metric_writer import read_jsonl
from tests.helpers import digits_config, hand_split_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_checkpoint_once_and_equal_to_in_process(tmp_path):
  config = digits_config(total_steps=20, checkpoint_every=5, keep_checkpoints=None)
  state = train.train(config, str(tmp_path))

  rows = evaluate.evaluate_checkpoints(config, str(tmp_path))
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert evaluate.evaluate_checkpoints(config, str(tmp_path)) == []  # nothing twice
  on_disk = read_jsonl(tmp_path / "eval_metrics.jsonl")
  assert [r["step"] for r in on_disk] == [5, 10, 15, 20]

  s, evaluators = evaluate.setup_for_eval(config)
  in_process = dict(evaluators[0].run(state.params, state.model_state))
  final = on_disk[-1]
  assert final["test/num_examples"] == data.num_examples(config.data, "test") == 180  # digits 0-4
  np.testing.assert_allclose(final["test/accuracy"], in_process["test/accuracy"], rtol=1e-6)
  np.testing.assert_allclose(final["test/loss"], in_process["test/loss"], rtol=1e-6)
  # ... and to the hand computation over the real examples only: 180 = 11 * 16 + 4, so the last
  # batch holds 12 padding rows (zero images, label 0) that must not count.
  assert config.batch_size == 16
  params, model_state = jax.device_get((state.params, state.model_state))
  loss, accuracy, n = hand_split_metrics(s.objective.model, {"params": params, **model_state},
                                         config.data, "test")
  assert n == 180
  np.testing.assert_allclose(final["test/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(final["test/accuracy"], accuracy, rtol=1e-6)


def test_watch_follows_a_running_job(tmp_path):
  config = digits_config(total_steps=30, checkpoint_every=10, keep_checkpoints=None)
  results = {}
  # The watcher's own timeout is far longer than the join: only a watcher that stops by itself once
  # the final step is evaluated passes.
  watcher = threading.Thread(target=lambda: results.setdefault("rows", evaluate.evaluate_checkpoints(
      config, str(tmp_path), watch=True, timeout=3600, poll_every=0.2)), daemon=True)
  watcher.start()
  train.train(config, str(tmp_path))
  watcher.join(timeout=120)
  assert not watcher.is_alive(), "the watcher must stop once the final step is evaluated"
  steps = [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")]
  assert steps == [10, 20, 30]  # keep_checkpoints=None: every saved checkpoint, each once
  assert [r["step"] for r in results["rows"]] == steps


def test_a_half_written_checkpoint_is_never_read(tmp_path):
  """Orbax writes a step into a temporary folder and renames it when complete; the evaluator must not
  touch such a folder (here: a tmp folder for step 30 holding garbage)."""
  config = digits_config(total_steps=10, checkpoint_every=10, keep_checkpoints=None)
  train.train(config, str(tmp_path))
  partial = tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "garbage").write_bytes(b"\x00half written")
  assert checkpoint.completed_steps(tmp_path) == [10]
  rows = evaluate.evaluate_checkpoints(config, str(tmp_path))
  assert [r["step"] for r in rows] == [10]


def _evaluate_cli(*args):
  """`python -m experiments.evaluate ARGS` in-process: (exit status, stderr lines)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(evaluate_entry.define_flags, evaluate_entry.main,
                         [evaluate_entry.__name__, *args])
  return status, err.getvalue().splitlines()


def test_evaluate_with_config_takes_its_eval_and_mesh_sections(tmp_path, caplog):
  """`experiments.evaluate --config=FILE` follows the run's model and data (a pretrain_digits run
  whose widths the file does not have) but takes the file's `eval` and `mesh` sections: a 3-device
  mesh, over which the run's batch of 16 does not split, is refused (the run's own mesh works), a 2-device mesh
  and `eval.splits=('train',)` evaluate the train split with the run's numbers."""
  config = digits_config(total_steps=4, checkpoint_every=4)
  state = train.train(config, str(tmp_path))
  pretrain = os.path.join(ROOT, "experiments/configs/pretrain_digits.py")

  status, lines = _evaluate_cli(f"--workdir={tmp_path}", f"--config={pretrain}",
                                "--config.mesh.axes=(('data',3),)")
  assert status == 2 and any("over the 3 devices" in line for line in lines), lines
  assert not (tmp_path / "eval_metrics.jsonl").exists()

  status, lines = _evaluate_cli(f"--workdir={tmp_path}", f"--config={pretrain}",
                                "--config.mesh.axes=(('data',2),)", "--config.eval.splits=('train',)")
  assert status == 0, lines
  assert any("differs from the run's" in r.getMessage() and "model.widths" in r.getMessage()
             for r in caplog.records), "the differences from the run's config are named"
  [row] = read_jsonl(tmp_path / "eval_metrics.jsonl")
  assert row["step"] == 4 and not any(key.startswith("test/") for key in row), row
  assert row["train/num_examples"] == data.num_examples(config.data, "train")

  params, model_state = jax.device_get((state.params, state.model_state))
  s = evaluate.setup_for_eval(config)[0]
  loss, accuracy, _ = hand_split_metrics(s.objective.model, {"params": params, **model_state},
                                         config.data, "train")
  np.testing.assert_allclose(row["train/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(row["train/accuracy"], accuracy, rtol=1e-6)
  merged = evaluate.effective_config(
      ml_collections.ConfigDict({**config.to_dict(), "mesh": {**config.mesh.to_dict(),
                                                              "axes": (("data", 2),)}}), tmp_path)
  assert merged.mesh.axes == (("data", 2),) and merged.model.widths == config.model.widths
