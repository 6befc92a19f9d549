"""Raw-pixel baselines (jtl/baselines.py): they see exactly the transfer runs' labelled examples and
test split, and the classifiers behave as their definitions say."""
import numpy as np
import pytest

from experiments.configs import transfer_digits
from jtl import baselines, data

SHOTS = 2


def target_data(shots=SHOTS, seed=0):
  c = transfer_digits.get_config(f"mode=scratch,shots={shots}").data
  c.shots_seed = seed
  return c


def test_nearest_neighbour_on_its_own_examples_is_exact():
  x, y = baselines.examples(target_data(), "train")
  assert np.all(baselines.nearest_neighbour(x, y, x) == y)


def test_nearest_neighbour_picks_the_closest_row():
  train_x = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
  train_y = np.array([2, 0, 1])
  x = np.array([[9.0, 1.0], [1.0, 8.0], [0.5, 0.5]], np.float32)
  assert baselines.nearest_neighbour(train_x, train_y, x).tolist() == [0, 1, 2]


def test_train_examples_are_k_per_class_and_those_the_training_pipeline_uses():
  c = target_data()
  x, y = baselines.examples(c, "train")
  classes = len(transfer_digits.TARGET_CLASSES)
  assert x.shape == (SHOTS * classes, 64)
  assert np.bincount(y, minlength=classes).tolist() == [SHOTS] * classes
  c.augment = False  # one epoch of the training pipeline, un-augmented, is the same set of examples
  batch = next(data.train_iterator(c, global_batch_size=SHOTS * classes, seed=0))
  train_rows = np.concatenate([batch["image"].reshape(len(x), -1), batch["label"][:, None]], 1)
  ours = np.concatenate([x, y[:, None].astype(np.float32)], 1)
  np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(train_rows, axis=0))
  assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0  # normalize='unit', as the runs


def test_another_shots_seed_draws_other_examples():
  x0, _ = baselines.examples(target_data(seed=0), "train")
  x1, _ = baselines.examples(target_data(seed=1), "train")
  assert not np.array_equal(np.unique(x0, axis=0), np.unique(x1, axis=0))


def test_scores_on_the_whole_target_test_split():
  c = target_data()
  x, y = baselines.examples(c)
  assert len(x) == data.num_examples(c, c.eval_split) == 179
  assert set(np.unique(y).tolist()) == set(range(len(transfer_digits.TARGET_CLASSES)))
  scores = baselines.pixel_baselines(c)
  assert set(scores) == set(baselines.NAMES)
  assert all(0.5 < v <= 1.0 for v in scores.values()), scores  # 2 shots: ~0.8, chance 0.2


def test_logistic_regression_fits_its_training_examples():
  x, y = baselines.examples(target_data(), "train")
  assert np.all(baselines.logistic_regression(x, y, x) == y)


@pytest.mark.parametrize("shots", [1, 5])
def test_shots_change_only_the_train_side(shots):
  c = target_data(shots)
  assert len(baselines.examples(c, "train")[0]) == shots * len(transfer_digits.TARGET_CLASSES)
  assert len(baselines.examples(c)[0]) == 179
