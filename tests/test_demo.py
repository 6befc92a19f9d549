"""The demo's claim, on its own configs: on one-shot handwritten digits 5–9, fine-tuning from the demo's
pretraining (handwritten 0–4 + elastic printed 0–9, `pretrain_mixed_digits.py`) with its recipe
(`transfer_digits.DEMO_RECIPE`: the printed head's rows 5–9, BatchNorm frozen) beats both raw-pixel
baselines on the same labelled examples by the issue's 10 points — mean test accuracy over three draws
of the one labelled example per class (measured: 0.903 against 0.723). Its step 0, the zero-shot
model, is the same for every draw (it has seen no target label) and already beats them (0.827)."""
import numpy as np

from experiments.configs import pretrain_mixed_digits, transfer_digits
from jtl import baselines, evaluate, train

SHOT_SEEDS = (0, 1, 2)
MARGIN = 0.10  # measured: +0.180 over the better baseline (1-NN)


def all_metrics(config, workdir):
  """Every evaluated step's metrics, in step order."""
  config.mesh.axes = (("data", 1),)  # the demo runs on one device; keep its numerics
  train.train(config, str(workdir))
  return evaluate.evaluate_checkpoints(config, str(workdir))


def test_transfer_beats_raw_pixel_baselines_on_one_shot_target(tmp_path):
  pretrain = tmp_path / "pretrain"
  source = all_metrics(pretrain_mixed_digits.get_config(), pretrain)[-1]
  # (elastic printed test digits are harder than handwritten 0-4: measured 1.000 and 0.954)
  assert source["test/handwritten/accuracy"] > 0.95 and source["test/printed/accuracy"] > 0.9
  finetune, zero_shot, pixels = [], [], {name: [] for name in baselines.NAMES}
  for seed in SHOT_SEEDS:
    config = transfer_digits.get_config(f"{transfer_digits.DEMO_RECIPE},shots=1,pretrain={pretrain}")
    config.data.shots_seed = seed
    for name, accuracy in baselines.pixel_baselines(config.data).items():
      pixels[name].append(accuracy)
    rows = all_metrics(config, tmp_path / f"finetune_{seed}")
    assert rows[0]["step"] == 0 and rows[-1]["step"] == config.total_steps
    zero_shot.append(rows[0]["test/accuracy"])
    finetune.append(rows[-1]["test/accuracy"])
  best_pixels = max(np.mean(v) for v in pixels.values())
  assert np.mean(finetune) > best_pixels + MARGIN, (finetune, pixels)
  assert len(set(zero_shot)) == 1 and zero_shot[0] > best_pixels, (zero_shot, pixels)
