"""Checkpoint-based evaluation: every checkpoint exactly once, numbers equal to in-process evaluation."""
import threading

import numpy as np

from jtl import evaluate, train
from jtl.metric_writer import read_jsonl
from tests.helpers import digits_config


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
  assert final["test/num_examples"] == in_process["test/num_examples"] > 0
  np.testing.assert_allclose(final["test/accuracy"], in_process["test/accuracy"], rtol=1e-6)
  np.testing.assert_allclose(final["test/loss"], in_process["test/loss"], rtol=1e-6)


def test_watch_follows_a_running_job(tmp_path):
  config = digits_config(total_steps=30, checkpoint_every=10, keep_checkpoints=None)
  results = {}
  watcher = threading.Thread(target=lambda: results.setdefault("rows", evaluate.evaluate_checkpoints(
      config, str(tmp_path), watch=True, timeout=300, poll_every=0.2)))
  watcher.start()
  train.train(config, str(tmp_path))
  watcher.join(timeout=300)
  assert not watcher.is_alive(), "the watcher must stop once the final step is evaluated"
  steps = [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")]
  assert steps == sorted(set(steps)) and steps[-1] == 30
  assert set(steps) <= {10, 20, 30}
