"""CLI contract: bad input exits non-zero with one line naming the fix, and writes no workdir."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "experiments/configs/pretrain_digits.py"


def run_cli(module, *args):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, expected", [
    ("--config.data.name=mnistt", "unknown dataset"),
    ("--config.trainable=(('params/haed/.*',True),('.*',False))", "matches no parameter"),
    ("--config.optim.learning_rate=0.1", "learning_rate"),
])
def test_bad_input_one_line_nonzero_no_workdir(tmp_path, override, expected):
  workdir = tmp_path / "run"
  result = run_cli("experiments.train", f"--config={PRETRAIN}", f"--workdir={workdir}", override)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  assert expected in errors[0]
  assert not workdir.exists()


def test_evaluate_without_checkpoints_fails_cleanly(tmp_path):
  result = run_cli("experiments.evaluate", f"--config={PRETRAIN}", f"--workdir={tmp_path / 'none'}")
  assert result.returncode != 0
  assert [l for l in result.stderr.splitlines() if l.startswith("error:")][0].count("no checkpoints")
  assert not (tmp_path / "none").exists()
