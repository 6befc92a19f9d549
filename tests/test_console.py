"""What a user sees on the console, through the real CLI in subprocesses (docs/console.md):

* a train run prints jtl's own lines only (no orbax/absl/TF INFO, no TensorFlow start-up notices),
  one step line per `log_every` with step/total, steps/s and ETA, and ends with one summary line that
  names its checkpoints and metrics; `--verbosity=1` brings the libraries' lines back;
* an evaluation ends with one summary line;
* each run writes its config for TensorBoard's HParams tab: TensorBoard's own HParams backend, pointed
  at a folder holding two runs (two cells of a sweep), lists one session per run with its `optim.lr`
  and its final train loss;
* the demo shows a failing run's `error:` line and stops with its exit status.
"""
import contextlib
import io
import logging
import os
import re
import subprocess
import sys

import pytest

from experiments import cli
from experiments import demo
from experiments import evaluate as evaluate_entry
from jtl import progress, startup_notices
from jtl.metric_writer import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "experiments/configs/pretrain_digits.py"
SMALL = ("--config.total_steps=6", "--config.batch_size=16", "--config.optim.warmup_steps=0",
         "--config.model.widths=(8,16)", "--config.checkpoint_every=3", "--config.log_every=2")
LR = {"quiet": 0.003, "verbose": 0.01}  # two cells of a sweep that differ in optim.lr
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.-]+):\d+\] ")
OWN_FILES = {name for top in ("jtl", "experiments") for _, _, files in os.walk(os.path.join(ROOT, top))
             for name in files if name.endswith(".py")}


def train_cli(workdir, *extra):
  """`python -m experiments.train` on a 6-step run; returns its combined output (exit 0 checked).
  TF_CPP_MIN_LOG_LEVEL is left unset, as in a user's shell."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["PYTHONPATH"] = ROOT
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={PRETRAIN}",
                         f"--workdir={workdir}", *SMALL, *extra], cwd=ROOT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout


def info_sources(output):
  """The source files of the absl-formatted INFO lines in `output`."""
  return {m[2] for m in map(ABSL_LINE.match, output.splitlines()) if m and m[1] == "I"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two finished runs under one root: `quiet` at the default verbosity, `verbose` with
  `--verbosity=1`; {name: (workdir, combined output)}."""
  root = tmp_path_factory.mktemp("sweep")
  out = {}
  for name, extra in (("quiet", ()), ("verbose", ("--verbosity=1",))):
    workdir = root / name
    out[name] = (workdir, train_cli(workdir, f"--config.optim.lr={LR[name]}", *extra))
  return out


def test_train_prints_its_own_lines_steps_with_eta_and_a_summary(runs):
  workdir, output = runs["quiet"]
  lines = output.strip().splitlines()
  foreign = info_sources(output) - OWN_FILES
  assert not foreign, (foreign, output[:3000])  # no orbax, absl (of others), TF or jax INFO line
  assert "oneDNN custom operations" not in output and "InitializeLog" not in output, output[:3000]
  assert "compiling the train step" in output  # a long silent moment says what it is
  step_lines = [line for line in lines if re.search(r"\] step \d+/6 ", line)]
  assert [re.search(r"step (\d+)/6 ", line)[1] for line in step_lines] == ["2", "4", "6"], output
  for line in step_lines:  # step/total, the metrics, steps/s and the ETA; nothing else per step
    assert re.search(r"step \d/6 .*loss=[\d.]+.*\| [\d.]+ steps/s, ETA \d+s$", line), line
  summary = ABSL_LINE.sub("", lines[-1])  # the last line: how far it got and where things are
  rows = read_jsonl(workdir / "train_metrics.jsonl")
  assert summary.startswith("trained to step 6/6 in "), summary
  assert f"loss={rows[-1]['loss']:.4g}" in summary, summary
  assert f"checkpoints {workdir}/checkpoints (steps 3, 6)" in summary, summary
  assert f"metrics {workdir}/train_metrics.jsonl" in summary, summary
  assert f"tensorboard --logdir={workdir}" in summary, summary


def test_verbosity_1_brings_the_library_lines_back(runs):
  _, output = runs["verbose"]
  assert info_sources(output) - OWN_FILES, output[:3000]  # orbax, TFDS, XLA ... at INFO
  # TF's start-up notices; absl's one is printed on every CPU (the oneDNN one only where TF turns
  # oneDNN on: not on AMD EPYC, for one)
  assert "All log messages before absl::InitializeLog() is called" in output, output[:3000]


def test_evaluate_ends_with_a_summary_line(runs, caplog):
  workdir, _ = runs["quiet"]
  caplog.set_level(logging.INFO, logger="absl")
  with contextlib.redirect_stderr(io.StringIO()) as err:
    status = cli.execute(evaluate_entry.define_flags, evaluate_entry.main,
                         ["evaluate", f"--workdir={workdir}"])
  assert status == 0, (err.getvalue()[-3000:], [r.getMessage() for r in caplog.records][-5:])
  rows = read_jsonl(workdir / "eval_metrics.jsonl")
  summary = caplog.records[-1].getMessage()
  assert summary.startswith("evaluated 2 checkpoints (steps 3, 6) in "), summary
  assert f"test/accuracy={rows[-1]['test/accuracy']:.4g} " in summary, summary
  assert " at step 6; " in summary, summary
  assert summary.endswith(f"rows in {workdir}/eval_metrics.jsonl"), summary


def hparams_sessions(logdir):
  """{optim.lr: {(metric group, tag): last value}} of every session TensorBoard's HParams backend
  finds under `logdir`: what its HParams tab shows."""
  # pylint: disable=g-import-not-at-top
  from tensorboard import context
  from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
  from tensorboard.plugins import base_plugin
  from tensorboard.plugins.hparams import (api_pb2, backend_context, get_experiment,
                                           list_session_groups)
  events = plugin_event_multiplexer.EventMultiplexer()
  events.AddRunsFromDirectory(str(logdir))
  events.Reload()
  tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=events,
                             data_provider=data_provider.MultiplexerDataProvider(events, str(logdir)))
  backend, request = backend_context.Context(tb), context.RequestContext()
  experiment = get_experiment.Handler(request, backend, "", api_pb2.GetExperimentRequest()).run()
  statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_RUNNING]
  groups = list_session_groups.Handler(request, backend, "", api_pb2.ListSessionGroupsRequest(
      start_index=0, slice_size=100, allowed_statuses=statuses,
      col_params=[api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos])).run()
  return {g.hparams["optim.lr"].number_value:
          {(v.name.group, v.name.tag): v.value for v in g.metric_values} for g in groups.session_groups}


def test_tensorboard_hparams_tab_compares_the_runs(runs):
  root = runs["quiet"][0].parent
  sessions = hparams_sessions(root)
  assert sorted(sessions) == pytest.approx(sorted(LR.values())), sessions
  for name, (workdir, _) in runs.items():
    final = read_jsonl(workdir / "train_metrics.jsonl")[-1]
    metrics = next(m for lr, m in sessions.items() if lr == pytest.approx(LR[name]))
    assert metrics[("train_metrics", "loss")] == pytest.approx(final["loss"], rel=1e-6), metrics
    assert metrics[("train_metrics", "accuracy")] == pytest.approx(final["accuracy"]), metrics


def test_demo_shows_a_failing_runs_error_line_and_stops(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)  # (the demo runs `python -m experiments.train` from the repository)
  with pytest.raises(SystemExit) as stopped:
    demo.run("experiments.train", "experiments/configs/no_such_config.py", tmp_path / "run",
             "[1/5] pretrain")
  assert stopped.value.code == 2
  printed = capsys.readouterr().out
  assert "[1/5] pretrain: failed (exit 2):\nerror: config file " in printed, printed
  assert "no_such_config.py' does not exist" in printed, printed
  assert printed.rstrip().endswith("no_such_config.py --workdir=" + str(tmp_path / "run")), printed
  assert not (tmp_path / "run").exists()


def test_start_up_notices_are_dropped_and_verbosity_is_read_before_flags_are_parsed():
  output = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796520340.935445   10871 port.cc:153] oneDNN custom operations are on.\n"
            b"I0000 00:00:1796520340.9   10871 cpu_feature_guard.cc:227] This TensorFlow binary ...\n"
            b"To enable the following instructions: AVX2 FMA, in other operations, rebuild ...\n"
            b"W0000 00:00:1796520352.830080   10871 gpu.cc:1] a real warning\n")
  assert startup_notices.without_notices(output) == output.splitlines(keepends=True)[-1]
  assert not startup_notices.verbose(["train", "--config=x.py", "--config.seed=1"])
  assert not startup_notices.verbose(["train", "--verbosity=0"])
  for argv in (["train", "--verbosity=1"], ["train", "-v", "2"], ["train", "--v=1"]):
    assert startup_notices.verbose(argv), argv


def test_the_summary_names_episodic_accuracies_not_their_baselines():
  row = {"step": 6, "test/5way1shot_accuracy": 0.92, "test/5way1shot_ci95": 0.007,
         "test/5way1shot_pixel_accuracy": 0.48, "test/proto/5way5shot_accuracy": 0.97,
         "test/zero_shot_accuracy_chance": 0.2, "train/loss": 0.5}
  assert progress.main_metrics(row) == (
      "test/5way1shot_accuracy=0.92 test/proto/5way5shot_accuracy=0.97 train/loss=0.5")
