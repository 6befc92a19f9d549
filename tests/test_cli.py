"""The CLI contract, in-process through the entry points' own code (`experiments.cli.execute`):

* every bad input a user can cause gives exactly one `error:` line, exit status 2, and leaves the
  workdir untouched (not created, or byte-for-byte as it was);
* relative paths work everywhere: train, resume, evaluate (with and without --config), transfer from a
  relative `init_from.workdir`, from a temporary current directory.
"""
import contextlib
import io
import json
import os
import shutil
import time

import pytest

from absl import flags

from experiments import cli
from experiments import evaluate as evaluate_entry
from experiments import explain as explain_entry
from experiments import export as export_entry
from experiments import train as train_entry
from jtl import config as config_lib
from jtl import lock as lock_lib
from jtl.metric_writer import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "experiments/configs/pretrain_digits.py")
TRANSFER = os.path.join(ROOT, "experiments/configs/transfer_digits.py")
FINETUNE = os.path.join(ROOT, "experiments/configs/finetune_digits.py")
FOLDER = os.path.join(ROOT, "experiments/configs/finetune_folder.py")
MULTITASK = os.path.join(ROOT, "experiments/configs/multitask_digits.py")
NOT_A_CONFIG = os.path.join(ROOT, "jtl/errors.py")  # a Python file without get_config
ENTRIES = {"train": train_entry, "evaluate": evaluate_entry, "explain": explain_entry,
           "export": export_entry}
# Config files that are broken in the ways a user's own file can be ("{cfg}/NAME.py").
BROKEN_CONFIGS = {
    "syntax": "def get_config(arg=None)\n  return None\n",
    "returns_int": "def get_config(arg=None):\n  return 1\n",
    "returns_dict": "def get_config(arg=None):\n  return {'total_steps': 3}\n",
    "imports": "import jtl_no_such_module\ndef get_config(arg=None):\n  return None\n",
    "raises": "def get_config(arg=None):\n  raise RuntimeError('boom')\n",
}
SMALL = ("--config.total_steps=4", "--config.batch_size=16", "--config.optim.warmup_steps=0",
         "--config.model.widths=(8,16)", "--config.checkpoint_every=2", "--config.log_every=2")


def run(entry, *args):
  """Runs an entry point in-process; returns (exit status, the `error:` lines it printed)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(entry.define_flags, entry.main, [entry.__name__, *args])
  return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def snapshot(path):
  """Every file under `path` with its size and mtime (None if `path` does not exist)."""
  if not os.path.exists(path):
    return None
  out = {}
  for folder, _, files in os.walk(path):
    for name in files:
      full = os.path.join(folder, name)
      out[os.path.relpath(full, path)] = (os.path.getsize(full), os.path.getmtime(full))
  return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny finished pretraining run (model widths (8, 16), checkpoints at steps 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("cli") / "pretrained")
  # (The None overrides are options documented as accepting None: they parse and the run takes them.)
  status, errors = run(train_entry, f"--config={PRETRAIN}", f"--workdir={workdir}", *SMALL,
                       "--config.keep_checkpoints=None", "--config.init_from.step=None",
                       "--config.data.data_dir=None", "--config.eval.batch_size=None")
  assert status == 0, errors
  return workdir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Folders the bad-input rows name: a one-class image folder, a multitask run's workdir (its
  config.json is all `explain` reads before it refuses), broken config files."""
  import numpy as np
  from PIL import Image

  from experiments.configs import multitask_digits
  root = tmp_path_factory.mktemp("inputs")
  for i in range(4):
    (root / "one_class" / "cat").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "one_class" / "cat" / f"{i}.png")
  (root / "multitask").mkdir()
  config_lib.run_config_path(root / "multitask").write_text(
      multitask_digits.get_config().to_json_best_effort())
  (root / "cfg").mkdir()
  for name, text in BROKEN_CONFIGS.items():
    (root / "cfg" / f"{name}.py").write_text(text)
  return dict(one_class=root / "one_class", mt=root / "multitask", cfg=root / "cfg")


# (entry point, config, extra arguments, expected part of the message). "{pre}" is the pretrained
# workdir, "{empty}" an existing empty folder; "{work}" is where the run would write.
BAD_INPUTS = [
    ("train", PRETRAIN, ["--config.lrr=1"], "(did you mean --config.optim.lr?)"),
    ("train", PRETRAIN, ["--config.optim.lrr=0.1"], "(did you mean --config.optim.lr?)"),
    ("train", PRETRAIN, ["--config.data.nmae=digits"], "did you mean --config.data.name?"),
    ("train", PRETRAIN, ["--config.data.name=mnistt"], "unknown dataset 'mnistt'"),
    ("train", PRETRAIN, ["--config.model.name=resnet9"], "unknown model 'resnet9'"),
    ("train", PRETRAIN, ["--config.model.patch_size=2"], "has no option(s) patch_size"),
    ("train", PRETRAIN, ["--config.model.name=vit_tiny"], "--config.model.patch_size"),
    ("train", PRETRAIN, ["--config.model.dtype=float8"], "unknown model dtype"),
    ("train", PRETRAIN, ["--config.model.widths=(8,-1)"], "widths must be positive"),
    ("train", PRETRAIN, ["--config.objective=simclrr"], "unknown objective"),
    ("train", PRETRAIN, ["--config.optim.name=adagradd"], "unknown optim.name"),
    ("train", PRETRAIN, ["--config.optim.schedule=cosinee"], "did you mean 'cosine'?"),
    ("train", PRETRAIN, ["--config.optim.lr=-1.0"], "optim.lr must be a number in (0.0"),
    ("train", PRETRAIN, ["--config.optim.weight_decay=-0.1"], "optim.weight_decay"),
    # (a warmup longer than the run is clipped to it, tests/test_short_runs.py; phases are spread
    # over it, but four phases cannot start in three steps)
    ("train", os.path.join(ROOT, "experiments/configs/finetune_digits.py") +
     ":method=unfreeze,pretrain={pre}", ["--config.total_steps=3"],
     "raise --config.total_steps to at least 4"),
    ("train", PRETRAIN, ["--config.total_steps=0"], "total_steps must be a positive integer"),
    ("train", PRETRAIN, ["--config.batch_size=-8"], "batch_size must be a positive integer"),
    ("train", PRETRAIN, ["--config.log_every=0"], "log_every must be a positive integer"),
    ("train", PRETRAIN, ["--config.checkpoint_every=0"], "checkpoint_every must be"),
    ("train", PRETRAIN, ["--config.label_smoothing=1.5"], "label_smoothing must be"),
    ("train", PRETRAIN, ["--config.total_steps=abc"], "takes a value of type int"),
    ("train", PRETRAIN, ["--config.data.shots=0"], "data.shots must be a positive int"),
    ("train", PRETRAIN, ["--config.data.train_split=trian"], "bad split 'trian'"),
    ("train", PRETRAIN, ["--config.data.train_split=train[:120%]"], "bad split"),
    ("train", PRETRAIN, ["--config.trainable=(('params/haed/.*',True),('.*',False))"],
     "matches no parameter; nearby paths: params/head/"),
    ("train", PRETRAIN, ["--config.batch_size=12"], "does not split over the 8 devices"),
    ("train", PRETRAIN, ["--config.init_from.workdir=/nonexistent/run"], "no checkpoint in"),
    ("train", PRETRAIN, ["--config.init_from.workdir={empty}"], "no checkpoint in"),
    ("train", TRANSFER + ":pretrain={pre}", [*SMALL[:-2], "--config.model.widths=(8,32)"],
     "shape mismatch"),
    ("train", TRANSFER + ":pretrain={pre}", [*SMALL[:-2], "--config.init_from.dont_load=('x/.*',)"],
     "dont_load pattern 'x/.*' matches no parameter"),
    ("train", TRANSFER + ":mode=bogus", [], "unknown mode 'bogus'"),
    ("train", PRETRAIN + "x", [], "does not exist"),
    ("train", PRETRAIN + "x", ["--config.total_steps=5"],
     f"config file '{PRETRAIN}x' does not exist; check the --config path"),
    ("train", NOT_A_CONFIG, [], "defines no get_config(); a config file is a Python file with"),
    ("train", NOT_A_CONFIG, ["--config.total_steps=5"], "defines no get_config()"),
    # (A run shorter than its phases is fitted, not refused: tests/test_short_runs.py.)
    ("train", FINETUNE + ":method=lora,rank=0,pretrain={pre}", [],
     "method=lora needs rank >= 1 adapters, got rank=0; pass e.g. :method=lora,rank=4"),
    ("train", PRETRAIN, ["--config.trainable=foo"],
     "trainable='foo' is neither a preset (head_only, bitfit, lora) nor a pattern that matches a "
     "parameter"),
    ("train", PRETRAIN, [*SMALL, "--workdir={locked}"], "is in use by another trainer (host "
     "elsewhere, PID 4321, since "),
    ("train", PRETRAIN, ["--workdirr=x"], "Did you mean: workdir"),
    ("train", PRETRAIN, ["--workdir=/proc/jtl_run"], "cannot write to workdir /proc/jtl_run"),
    ("train", PRETRAIN, [*SMALL[:-1], "--config.model.widths=(8,32)", "--workdir={pre}"],
     "holds checkpoints of a different experiment: model.widths"),
    ("evaluate", None, ["--workdir={pre}", "--step=999"], "no checkpoint for step 999"),
    ("evaluate", None, ["--workdir={empty}"], "no checkpoints in"),
    ("evaluate", PRETRAIN, ["--workdir={pre}", "--config.optim.lrr=1"], "unknown config key"),
    ("evaluate", None, [], "--workdir is required"),
    # Heads that cannot learn the labels (a softmax over one class has loss 0).
    ("train", FOLDER + ":path={one_class}", [],
     "a classifier needs at least 2 classes: image folder {one_class} holds a single class folder"),
    ("train", PRETRAIN, ["--config.model.num_classes=0"],
     "model.num_classes=0: a classifier needs at least 2 classes"),
    ("train", PRETRAIN, ["--config.model.num_classes=1"], "set --config.model.num_classes=5"),
    ("train", PRETRAIN, ["--config.data.labels=(0,1,2,3,4,5,6)"],
     "data has 7 classes but model.num_classes=5: labels 5..6 have no output; set "
     "--config.model.num_classes=7"),
    ("train", PRETRAIN, ["--config.data.labels=(3,)"], "data selects a single class"),
    # Batches whose activations cannot fit (the digits CNN keeps ~90 KB per example).
    ("train", PRETRAIN, ["--config.batch_size=10000000"],
     "batch_size=10000000 needs at least "),
    ("train", PRETRAIN, ["--config.batch_size=1000000000", "--config.grad_accum_steps=8"],
     "examples at once), more than the "),
    # Mesh rules.
    ("train", PRETRAIN, ["--config.mesh.rules=(('.*/kernel',('model',None)),('.*',()))"],
     "names axis 'model', which the mesh lacks (its axes: data)"),
    ("train", PRETRAIN, ["--config.mesh.axes=(('data',-1),('fsdp',8))",
                         "--config.mesh.rules=(('.*/kernel',('fsdp',None)),('.*',()))"],
     "cannot split a dimension of size 3 of params/backbone/stage1/conv/kernel"),
    # Non-finite numbers.
    ("train", PRETRAIN, ["--config.optim.lr=inf"], "optim.lr must be a number in (0.0, inf), got inf"),
    ("train", PRETRAIN, ["--config.optim.clip_norm=inf"],
     "optim.clip_norm must be a number in (0.0, inf), got inf"),
    # Config files that do not load.
    ("train", "{cfg}/syntax.py", [], "has a syntax error at line 1: expected ':'; fix the file"),
    ("train", "{cfg}/syntax.py", ["--config.total_steps=5"], "has a syntax error at line 1"),
    ("train", "{cfg}/returns_int.py", [], "get_config() returned a value of type int, not an "
     "ml_collections.ConfigDict"),
    ("train", "{cfg}/returns_int.py", ["--config.total_steps=5"], "returned a value of type int"),
    ("train", "{cfg}/returns_dict.py", [], "returned a value of type dict"),
    ("train", "{cfg}/imports.py", [], "cannot be imported (No module named 'jtl_no_such_module')"),
    ("train", "{cfg}/raises.py", [], "get_config raised RuntimeError: boom"),
    # `--config.KEY=None` reaches the key's owner, which says whether None is valid there.
    ("train", PRETRAIN, ["--config.total_steps=None"], "total_steps must be a positive integer, got None"),
    ("train", PRETRAIN, ["--config.optim.lrr=None"], "(did you mean --config.optim.lr?)"),
    ("train", PRETRAIN, ["--config.evals.test.type=bogus"],
     "--config.evals.test.type: config.evals has no 'test' (it has: nothing); the command line sets"),
    ("train", PRETRAIN, ["--config.data.per_class=3"],
     "batch_size=64 is not a multiple of data.per_class=3"),
    ("train", PRETRAIN, ["--config.data.per_class=4", "--config.data.cache=False"],
     "data.per_class (class-balanced batches) needs the split in memory"),
    ("train", MULTITASK, ["--config.data.label_fraction.left=0.25"],
     "config.data.label_fraction has no keys: set it whole, e.g. "
     "--config.data.label_fraction=\"{{'left': VALUE}}\""),
    ("train", MULTITASK, ["--config.data.label_fraction={{'left': 0}}"],
     "data.label_fraction.left must be a number in (0, 1], got 0"),
    ("train", PRETRAIN, ["--config.data.label_fraction={{'label': 0.5}}"],
     "data.label_fraction hides training labels, which only the multitask objective skips"),
    ("train", PRETRAIN, ["--config.data.train_split=train[:0]"],
     "split 'train[:0]' of dataset 'sklearn_digits' holds no examples"),
    # explain and export.
    ("explain", None, ["--workdir={mt}"], "objective 'multitask': its model returns ("),
    ("export", None, ["--workdir={pre}", "--out=/proc/jtl_export.npz"],
     "cannot write --out=/proc/jtl_export.npz"),
    ("export", None, ["--workdir={pre}", "--out={empty}"], "is an existing folder; name a file"),
]


@pytest.mark.parametrize("entry, config, extra, expected", BAD_INPUTS,
                         ids=[f"{e}:{' '.join(x) or (c or '').rsplit('/', 1)[-1]}" for e, c, x, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(pretrained, inputs, tmp_path, entry, config,
                                                      extra, expected):
  empty = tmp_path / "empty"
  empty.mkdir()
  locked = tmp_path / "locked"  # a run whose trainer still runs, on another machine
  shutil.copytree(pretrained, locked)
  (locked / lock_lib.LOCK_FILE).write_text(json.dumps({
      "host": "elsewhere", "pid": 4321, "machine": "elsewhere", "started": time.time() - 60,
      "heartbeat": time.time(), "token": "theirs"}))
  work = str(tmp_path / "run")
  names = dict(pre=pretrained, empty=empty, locked=locked, **inputs)
  args = [a.format(**names) for a in extra]
  if config:
    args.insert(0, "--config=" + config.format(**names))
  if entry == "train" and not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={work}")
  watched = [work, pretrained, str(empty), str(locked), *map(str, inputs.values())]
  before = [snapshot(p) for p in watched]
  status, errors = run(ENTRIES[entry], *args)
  assert status == 2 and len(errors) == 1, (status, errors)
  assert expected.format(**names) in errors[0], errors[0]
  assert [snapshot(p) for p in watched] == before


# Options documented as accepting None (config comments, docstrings, docs/): `--config.KEY=None`
# must give None, whatever the key's type (int, str and tuple keys each failed differently), and
# the run's checks must take it.
DOCUMENTED_NONE = ("keep_checkpoints", "init_from.step", "init_from.workdir", "init_from.path",
                   "compilation_cache", "data.data_dir", "data.labels", "data.shots",
                   "data.image_size", "eval.splits", "eval.batch_size", "optim.clip_norm",
                   "optim.layer_decay", "model.widths")


def parsed_config(*args):
  """The config `experiments.train` would run with these arguments (parsing only)."""
  argv = ["train", f"--config={PRETRAIN}", "--workdir=never_written", *args]
  flag_values = flags.FlagValues()
  train_entry.define_flags(flag_values, argv)
  flag_values(argv)
  return cli.load_config(flag_values)


def test_options_documented_as_none_accept_none():
  config = parsed_config(*[f"--config.{key}=None" for key in DOCUMENTED_NONE])
  flat = config_lib.flatten(config.to_dict())
  assert {key: flat[key] for key in DOCUMENTED_NONE} == dict.fromkeys(DOCUMENTED_NONE)
  assert parsed_config().data.labels == (0, 1, 2, 3, 4)  # (not None unless asked)
  from jtl import data, objectives
  prepared = config_lib.prepare(config)  # the checks take them ...
  assert prepared.data.data_dir is None  # (not the path of a folder named 'None')
  data.validate(prepared.data)
  with pytest.raises(Exception, match="model.num_classes=5"):  # (all 10 digits, a 5-way head)
    objectives.build(prepared)
  prepared.model.num_classes = 10
  model = objectives.build(prepared).model  # ... and the model takes its default widths
  assert model.backbone.widths == (32, 64, 128)


def test_tfds_dataset_not_prepared_offline(tmp_path, monkeypatch):
  from jtl.data import source
  monkeypatch.setattr(source, "_network_reachable", lambda *a, **k: False)
  work = tmp_path / "run"
  status, errors = run(train_entry, f"--config={PRETRAIN}", f"--workdir={work}",
                       "--config.data.name=mnist", f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert status == 2 and len(errors) == 1 and "not prepared" in errors[0], errors
  assert "tfds build mnist" in errors[0] and not work.exists()


def test_model_options_from_the_command_line(tmp_path):
  """The registry's own options are settable (the advice of the patch_size message can be followed)."""
  status, errors = run(train_entry, f"--config={PRETRAIN}", f"--workdir={tmp_path / 'vit'}",
                       "--config.model.name=vit", "--config.model.patch_size=2",
                       "--config.model.width=16", "--config.model.depth=1", "--config.model.num_heads=2",
                       "--config.model.mlp_dim=32", "--config.model.dtype=bfloat16", *SMALL[:3])
  assert status == 0, errors
  model = config_lib.load_run_config(tmp_path / "vit").model
  assert (model.name, model.patch_size, model.dtype) == ("vit", 2, "bfloat16")


def test_relative_paths_train_resume_evaluate_transfer(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run(train_entry, f"--config={PRETRAIN}", "--workdir=runs/pre", *SMALL)[0] == 0
  pre = tmp_path / "runs" / "pre"
  assert [r["step"] for r in read_jsonl(pre / "train_metrics.jsonl")] == [2, 4]
  # Resume with more steps (a change a resumed run may make): only the new steps are trained.
  assert run(train_entry, f"--config={PRETRAIN}", "--workdir=runs/pre", *SMALL,
             "--config.total_steps=6")[0] == 0
  assert [r["step"] for r in read_jsonl(pre / "train_metrics.jsonl")] == [2, 4, 6]
  # Evaluate from the run's own config.json, with a relative workdir and no --config.
  assert run(evaluate_entry, "--workdir=runs/pre")[0] == 0
  assert [r["step"] for r in read_jsonl(pre / "eval_metrics.jsonl")] == [2, 4, 6]
  # Transfer from a relative init_from.workdir; config.json records where things really were.
  status, errors = run(train_entry, f"--config={TRANSFER}:mode=linear_probe,pretrain=runs/pre",
                       "--workdir=runs/probe", *SMALL)
  assert status == 0, errors
  recorded = config_lib.load_run_config(tmp_path / "runs" / "probe")
  assert recorded.init_from.workdir == str(pre)
  assert run(evaluate_entry, "--workdir=runs/probe", "--step=4")[0] == 0
  assert [r["step"] for r in read_jsonl(tmp_path / "runs/probe/eval_metrics.jsonl")] == [4]


def test_late_callbacks_into_a_closed_event_loop_are_not_printed(monkeypatch):
  """After a failed save, tensorstore's callbacks into orbax's ended asyncio loop raise `Event loop
  is closed` as unraisable exceptions (tests/test_kill.py sees them on a real `ulimit -f`, when the
  race lets them happen): the CLI drops those, and every other unraisable exception still shows."""
  shown = []
  monkeypatch.setattr("sys.unraisablehook", lambda unraisable: shown.append(str(unraisable.exc_value)))
  cli._closed_loop_callbacks_unprinted()

  class RaisesWhenCollected:
    def __init__(self, message):
      self.message = message

    def __del__(self):
      raise RuntimeError(self.message)

  RaisesWhenCollected("Event loop is closed")
  RaisesWhenCollected("something else")
  assert shown == ["something else"]
