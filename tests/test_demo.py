"""`make demo` exactly as a user runs it (the Makefile's recipe, one CPU device), and the demo's claim.

The console contract (docs/console.md): exit 0, at most 40 lines, the table last. The claim, on the
demo's own runs: on one-shot handwritten digits 5–9, fine-tuning from the demo's pretraining
(handwritten 0–4 + elastic printed 0–9, `pretrain_mixed_digits.py`) with its recipe
(`transfer_digits.DEMO_RECIPE`: the printed head's rows 5–9, BatchNorm frozen) beats both raw-pixel
baselines on the same labelled examples by the issue's 10 points — mean test accuracy over three
draws of the one labelled example per class: the demo's own draw (`shots_seed` 0, from its table) and
two more fine-tuned here from the demo's pretraining run (measured: 0.881 against 0.723; in `make
test-all`; CI checks that the demo's own draw beats them). Its step 0, the zero-shot model, is the
same for every draw (it has seen no target label) and already beats them (0.810). CI runs this test,
not `make demo` again.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import transfer_digits
from jtl import baselines, evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 40  # docs/console.md
EXTRA_SHOT_SEEDS = (1, 2)  # the demo's own draw is shots_seed 0
MARGIN = 0.10  # over three draws; measured: +0.158 over the better baseline (1-NN)


def make_demo(workdir):
  """`make demo WORKDIR=...` through the Makefile, with this interpreter as the venv's python (`-o`:
  the venv's install stamp counts as done); stdout and stderr together, as a terminal shows them."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
  result = subprocess.run(
      ["make", "--no-print-directory", "-o", ".venv/.installed-stamp", "demo",
       f"PY={sys.executable}", f"WORKDIR={workdir}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
  lines = result.stdout.splitlines()
  assert result.returncode == 0, "\n".join(lines[-40:])
  assert "experiments.demo" in lines[0], lines[0]  # make echoes its recipe first
  return lines[1:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """`make demo` once for this module: (its workdir, its console lines)."""
  workdir = tmp_path_factory.mktemp("demo") / "demo"
  return workdir, make_demo(workdir)


def test_make_demo_prints_its_table_and_transfer_beats_raw_pixel_baselines(demo):
  """The console contract and the claim on the demo's own draw of the one labelled example."""
  workdir, lines = demo
  assert len(lines) <= MAX_LINES, "\n".join(lines)
  assert lines[-1].startswith("zero_shot "), "the table is not the last thing printed"
  table = _table(lines)
  assert list(table) == ["pretrain", *baselines.PIXELS, "scratch", "linear_probe", "finetune",
                         "zero_shot"], table
  assert table["pretrain"] > 0.95  # handwritten 0-4
  assert (workdir / "plots" / "transfer_digits.png").exists()
  pixels = baselines.pixel_baselines(_config(workdir, 0).data)
  assert all(abs(table[name] - pixels[name]) < 6e-4 for name in baselines.PIXELS), table
  # The demo's own draw is an easy one for the pixels: fine-tuning and zero-shot beat them by less
  # (measured +0.028 and +0.006 over logistic regression); the 10 points hold for the mean of three.
  assert table["finetune"] > max(pixels.values()), (table, pixels)
  assert table["zero_shot"] > max(pixels.values()), (table, pixels)


@pytest.mark.slow
def test_the_claim_holds_over_three_draws_of_the_labelled_examples(demo, tmp_path):
  """The README's figure: the mean over the demo's draw and two more fine-tuned here from the demo's
  pretraining run; the zero-shot step 0 is the same model for every draw."""
  workdir, lines = demo
  table = _table(lines)
  finetune, zero_shot = [table["finetune"]], [table["zero_shot"]]
  pixels = {name: [] for name in baselines.PIXELS}
  for seed in (0, *EXTRA_SHOT_SEEDS):
    config = _config(workdir, seed)
    for name, accuracy in baselines.pixel_baselines(config.data).items():
      pixels[name].append(accuracy)
    if seed == 0:  # the demo's own draw: its rows are in the table
      continue
    config.mesh.axes = (("data", 1),)  # the demo runs on one device; keep its numerics
    train.train(config, str(tmp_path / f"finetune_{seed}"))
    rows = evaluate.evaluate_checkpoints(config, str(tmp_path / f"finetune_{seed}"))
    assert rows[0]["step"] == 0 and rows[-1]["step"] == config.total_steps
    zero_shot.append(round(rows[0]["test/accuracy"], 3))
    finetune.append(rows[-1]["test/accuracy"])
  best_pixels = max(np.mean(v) for v in pixels.values())
  assert np.mean(finetune) > best_pixels + MARGIN, (finetune, pixels)
  assert len(set(zero_shot)) == 1 and zero_shot[0] > best_pixels, (zero_shot, pixels)


def _table(lines):
  header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "trainable"])
  return {line.split()[0]: float(line.split()[3]) for line in lines[header + 1:]}


def _config(workdir, shots_seed):
  """The demo's fine-tuning config for a draw of the labelled examples."""
  config = transfer_digits.get_config(
      f"{transfer_digits.DEMO_RECIPE},shots=1,pretrain={workdir / 'pretrain_digits'}")
  config.data.shots_seed = shots_seed
  return config
