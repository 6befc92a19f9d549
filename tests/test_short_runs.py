"""Short runs work: every config at `total_steps=10` gets through config preparation, its phase
schedule and its learning-rate schedules; a warmup or a phase start past the end of the run is fitted
into it with one log line; a schedule that cannot fit stops with one `error:` line. And one real CLI
smoke run: a 10-step pretraining, then a 10-step fine-tuning from it."""
from __future__ import annotations

import glob
import importlib
import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from experiments import train as train_entry
from jtl import config as config_lib
from jtl import optim, phases
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl
from tests.helpers import compile_fast  # noqa: F401  (autouse: this module compiles fast)
from tests.test_cli import ROOT, run

CONFIGS = sorted(os.path.basename(p)[:-3]
                 for p in glob.glob(os.path.join(ROOT, "experiments/configs/*.py"))
                 if not os.path.basename(p).startswith(("__", "common")))
# Every mode of the configs that have modes (the phased fine-tuning methods among them).
VARIANTS = [(name, None) for name in CONFIGS if name != "finetune_folder"]  # (needs path=)
VARIANTS += [("finetune_digits", f"method={m}") for m in ("linear_probe", "llrd", "lpft", "unfreeze",
                                                          "lora", "bitfit")]
VARIANTS += [("transfer_digits", f"mode={m}") for m in ("scratch", "linear_probe")]
VARIANTS += [("dann_digits", f"mode={m}") for m in ("source_only", "source_only_target_bn",
                                                    "target_supervised")]
VARIANTS += [("distill_digits", f"mode={m}") for m in ("teacher", "labels_only")]
VARIANTS += [("finetune_folder", f"path={ROOT},init={ROOT},method={m}")
             for m in ("full", "lpft", "unfreeze")]
VARIANTS += [("clip_digits", "loss=sigmoid"), ("coral_digits", "method=mmd"),
             ("multitask_digits", "weighting=pcgrad"), ("multitask_glyphs", "scarce=character")]
VARIANTS += [("maml_glyphs", f"method={m}") for m in ("fomaml", "anil")]
VARIANTS += [("episodes_glyphs", f"learner={m}") for m in ("maml", "simclr", "supcon")]


def _config(name: str, arg: str | None, total_steps: int) -> ml_collections.ConfigDict:
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config(arg) if arg is not None else module.get_config()
  config.total_steps = total_steps
  return config


def test_every_config_is_covered():
  assert {name for name, _ in VARIANTS} == set(CONFIGS)
  assert "transfer_digits" in CONFIGS and len(CONFIGS) >= 14


@pytest.mark.parametrize("name,arg", VARIANTS, ids=[f"{n}:{a}" if a else n for n, a in VARIANTS])
def test_every_config_runs_ten_steps(name, arg):
  """Preparation, the phases and every phase's learning-rate schedule at total_steps=10: the warmup
  ends inside the run, every phase starts inside it, the rate is finite and positive after step 0."""
  config = config_lib.prepare(_config(name, arg, 10))
  schedule = phases.schedule(config)
  assert [p.start for p in schedule] == sorted({p.start for p in schedule})
  assert schedule[0].start == 0 and all(p.start < 10 for p in schedule)
  assert config.optim.get("warmup_steps", 0) < 10
  for phase in schedule:
    lr = optim.make_schedule(phases.phase_config(config, phase).optim, config.total_steps)
    rates = np.asarray([float(lr(step)) for step in range(10)])
    assert np.all(np.isfinite(rates)) and np.all(rates[1:] > 0), rates
  # Preparing the prepared config changes nothing (config.json holds what the run used; a resume
  # prepares it again).
  assert config_lib.prepare(config).to_dict() == config.to_dict()


def test_warmup_longer_than_the_run_is_clipped_with_one_log_line(caplog):
  config = _config("transfer_digits", "mode=finetune", 10)
  assert config.optim.warmup_steps == 10  # the config's own warmup: refused before this fix
  with caplog.at_level(logging.WARNING):
    prepared = config_lib.prepare(config)
    config_lib.prepare(prepared)  # (train() and setup() both prepare: still one line)
  lines = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
  assert len(lines) == 1 and "clipped to 5" in lines[0] and "--config.optim.warmup_steps" in lines[0]
  assert prepared.optim.warmup_steps == 5
  lr = optim.make_schedule(prepared.optim, 10)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5)], [0.0, prepared.optim.lr], rtol=1e-6)
  # A warmup shorter than the run is left alone, without a line.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert config_lib.prepare(_config("transfer_digits", "mode=finetune", 11)).optim.warmup_steps == 10
  assert not [r for r in caplog.records if "warmup" in r.getMessage()]


def test_phases_past_the_end_start_inside_the_run(caplog):
  config = _config("finetune_digits", "method=unfreeze", 10)  # phases at 0, 40, 80, 120
  assert [p[0] for p in config.phases] == [0, 40, 80, 120]
  with caplog.at_level(logging.WARNING):
    prepared = config_lib.prepare(config)
  assert [p.start for p in phases.schedule(prepared)] == [0, 2, 5, 7]
  # The rule tables stay with their phases.
  assert [p[1:] for p in prepared.phases] == [tuple(p[1:]) for p in config.phases]
  lines = [r.getMessage() for r in caplog.records if "phases start" in r.getMessage()]
  assert len(lines) == 1 and "(0, 2, 5, 7)" in lines[0]
  lpft = config_lib.prepare(_config("finetune_digits", "method=lpft,lp_steps=50", 10))
  assert [p.start for p in phases.schedule(lpft)] == [0, 5]
  # Phases that fit are left alone.
  fits = config_lib.prepare(_config("finetune_digits", "method=lpft,lp_steps=3", 10))
  assert [p.start for p in phases.schedule(fits)] == [0, 3]


def test_more_phases_than_steps_is_one_clear_error():
  config = _config("finetune_digits", "method=unfreeze", 3)  # four phases, three steps
  with pytest.raises(ConfigError, match=r"raise --config.total_steps to at least 4"):
    config_lib.prepare(config)


@pytest.fixture(scope="module")
def pretrained_ten_steps(tmp_path_factory):
  """A 10-step pretraining run from the CLI, the config's own warmup (20 steps) clipped."""
  workdir = str(tmp_path_factory.mktemp("short") / "pre")
  status, errors = run(train_entry, f"--config={ROOT}/experiments/configs/pretrain_digits.py",
                       f"--workdir={workdir}", "--config.total_steps=10",
                       "--config.model.widths=(8,16)", "--config.batch_size=16")
  assert status == 0, errors
  return workdir


def test_ten_step_finetune_from_the_cli(pretrained_ten_steps, tmp_path):
  work = str(tmp_path / "ft")
  status, errors = run(train_entry, f"--config={ROOT}/experiments/configs/transfer_digits.py:"
                       f"mode=finetune,pretrain={pretrained_ten_steps}", f"--workdir={work}",
                       "--config.total_steps=10", "--config.model.widths=(8,16)")
  assert status == 0, errors
  assert os.path.isdir(os.path.join(work, "checkpoints", "10"))
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["optim"]["warmup_steps"] == 5
  rows = read_jsonl(os.path.join(work, "train_metrics.jsonl"))
  assert rows[-1]["step"] == 10 and np.isfinite(rows[-1]["loss"])
  with open(os.path.join(pretrained_ten_steps, "config.json")) as f:
    assert json.load(f)["optim"]["warmup_steps"] == 5
