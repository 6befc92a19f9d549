"""The demo's claim, on its own configs: on one-shot digits 5–9, transfer from the 0–4 run beats
training from scratch (mean test accuracy over three draws of the one labelled example per class)."""
import numpy as np

from experiments.configs import pretrain_digits, transfer_digits
from jtl import evaluate, train

SHOT_SEEDS = (0, 1, 2)


def final_accuracy(config, workdir):
  config.mesh.axes = (("data", 1),)  # the demo runs on one device; keep its numerics
  train.train(config, str(workdir))
  return evaluate.evaluate_checkpoints(config, str(workdir))[-1]["test/accuracy"]


def test_transfer_beats_scratch_on_one_shot_target(tmp_path):
  pretrain = tmp_path / "pretrain"
  assert final_accuracy(pretrain_digits.get_config(), pretrain) > 0.95  # source task 0-4
  accuracy = {}
  for mode in ("scratch", "finetune"):
    accuracy[mode] = []
    for seed in SHOT_SEEDS:
      config = transfer_digits.get_config(f"mode={mode},shots=1,pretrain={pretrain}")
      config.data.shots_seed = seed
      accuracy[mode].append(final_accuracy(config, tmp_path / f"{mode}_{seed}"))
  assert np.mean(accuracy["finetune"]) > np.mean(accuracy["scratch"]) + 0.02, accuracy
