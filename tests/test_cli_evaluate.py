"""The evaluator's side of the CLI contract (`experiments.evaluate`), in-process as tests/test_cli.py:

* what it did not do is said, once: steps already evaluated, a watched run that stopped early;
* a given --config that differs from the run's own config.json is named and the run's is followed.
"""
import json
import logging
import shutil

import pytest

from experiments import evaluate as evaluate_entry
from jtl import config as config_lib
from jtl.metric_writer import read_jsonl
from tests.test_cli import PRETRAIN, pretrained, run  # noqa: F401  (pretrained: a fixture)


@pytest.fixture(scope="module")
def evaluated(pretrained, tmp_path_factory):
  """A copy of the pretrained run with both checkpoints evaluated."""
  workdir = tmp_path_factory.mktemp("cli") / "evaluated"
  shutil.copytree(pretrained, workdir)
  assert run(evaluate_entry, f"--workdir={workdir}")[0] == 0
  return workdir


@pytest.fixture()
def preempted(pretrained, tmp_path):
  """A run stopped (SIGTERM) at step 4 of 8: checkpoints 2 and 4, total_steps 8, no trainer."""
  workdir = tmp_path / "preempted"
  shutil.copytree(pretrained, workdir)
  recorded = json.loads(config_lib.run_config_path(workdir).read_text())
  recorded["total_steps"] = 8
  config_lib.run_config_path(workdir).write_text(json.dumps(recorded))
  return workdir


# Not bad input, but no silent outcome either: (arguments, exit status, what stderr/the log says).
# "{evaluated}" is a run whose checkpoints are all evaluated, "{preempted}" one stopped before its end.
SAID_NOT_SILENT = [
    (["--workdir={evaluated}", "--step=2"], 0,
     "step 2 of {evaluated} was already evaluated (its row is in {evaluated}/eval_metrics.jsonl); "
     "nothing to do (delete that row to evaluate it again)"),
    (["--workdir={evaluated}"], 0, "all 2 checkpoints of {evaluated} (steps 2..4) already evaluated"),
    (["--workdir={evaluated}", "--watch"], 0, "all 2 checkpoints of {evaluated} (steps 2..4) already "
     "evaluated (rows in {evaluated}/eval_metrics.jsonl); nothing to do"),
    (["--workdir={preempted}", "--watch", "--timeout=60", "--poll_every=5"], 3,
     "waiting for step 8 of {preempted} (newest checkpoint: step 4; no trainer is running there (no "
     "live trainer.lock): it finished early, was stopped or preempted); giving up after "
     "--timeout=60 s"),
    (["--workdir={preempted}", "--watch", "--timeout=60", "--poll_every=5"], 3,
     "error: --watch gave up after --timeout=60 s: step 8 of {preempted} never appeared (its newest "
     "checkpoint is step 4, 2 evaluated; no trainer is running there"),
]


class FakeClock:
  """The evaluator's `time`: sleeping advances the clock at once, so a watch times out on cue."""

  def __init__(self):
    self.now = 1e9

  def time(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds


@pytest.mark.parametrize("extra, status, expected", SAID_NOT_SILENT,
                         ids=[" ".join(x) for x, _, _ in SAID_NOT_SILENT])
def test_evaluator_says_what_it_did_not_do(evaluated, preempted, caplog, monkeypatch, extra, status,
                                          expected):
  import jtl.evaluate
  monkeypatch.setattr(jtl.evaluate, "time", FakeClock())
  caplog.set_level(logging.INFO, logger="absl")
  names = dict(evaluated=evaluated, preempted=preempted)
  got, errors = run(evaluate_entry, *[a.format(**names) for a in extra])
  assert got == status, (got, errors)
  assert len(errors) == (status != 0)
  said = caplog.text + "\n".join(errors)
  assert said.count(expected.format(**names)) == 1, said[-2000:]  # said, and said once


def test_evaluate_follows_the_run_config_over_a_different_given_one(pretrained, tmp_path, caplog,
                                                                 monkeypatch):
  """The given config says 400 steps and another model; the run's config.json wins, and --watch on
  the finished run ends at once instead of waiting for a step 400 that never comes."""
  import jtl.evaluate

  def no_waiting(seconds):
    raise AssertionError("the watcher waited for a step the run will never reach")
  monkeypatch.setattr(jtl.evaluate.time, "sleep", no_waiting)
  workdir = tmp_path / "copy"
  shutil.copytree(pretrained, workdir)
  (workdir / "eval_metrics.jsonl").unlink(missing_ok=True)
  status, errors = run(evaluate_entry, f"--config={PRETRAIN}", f"--workdir={workdir}", "--watch",
                       "--timeout=60", "--poll_every=0.1", "--config.model.name=mlp")
  assert status == 0, errors
  assert [r["step"] for r in read_jsonl(workdir / "eval_metrics.jsonl")] == [2, 4]
  assert "model.name" in caplog.text and "total_steps" in caplog.text

