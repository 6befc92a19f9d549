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
  assert set(scores) == set(baselines.PIXELS)
  assert all(0.5 < v <= 1.0 for v in scores.values()), scores  # 2 shots: ~0.8, chance 0.2


def test_logistic_regression_fits_its_training_examples():
  x, y = baselines.examples(target_data(), "train")
  assert np.all(baselines.logistic_regression(x, y, x) == y)


@pytest.mark.parametrize("shots", [1, 5])
def test_shots_change_only_the_train_side(shots):
  c = target_data(shots)
  assert len(baselines.examples(c, "train")[0]) == shots * len(transfer_digits.TARGET_CLASSES)
  assert len(baselines.examples(c)[0]) == 179


def test_majority_and_another_feature_as_the_target():
  """`majority` predicts the most frequent training label (ties: the smallest); `feature` scores
  another target of the same images (digit_attributes' parity) against a hand count."""
  assert baselines.majority(np.array([3, 1, 1, 3, 2]), np.zeros([4, 2])).tolist() == [1] * 4
  c = data.default_data_config()
  c.name = "digit_attributes"
  _, parity = baselines.examples(c, feature="parity")
  _, label = baselines.examples(c)
  np.testing.assert_array_equal(parity, label % 2)
  train_parity = baselines.examples(c, "train", feature="parity")[1]
  expected = np.mean(parity == np.argmax(np.bincount(train_parity)))
  assert baselines.scores(c, ("majority",), ("parity",)) == {"parity": {"majority": expected}}
  # Several targets at once: each as on its own (the images read once).
  both = baselines.scores(c, ("majority", "pixels_1nn"), ("parity", "label"))
  assert both["label"] == baselines.scores(c, ("majority", "pixels_1nn"))["label"]
  assert both["parity"]["majority"] == expected


def test_nearest_neighbour_in_blocks_equals_all_at_once(monkeypatch):
  rng = np.random.default_rng(0)
  train_x, x = rng.normal(size=(50, 6)), rng.normal(size=(23, 6))
  train_y = rng.integers(0, 4, 50)
  whole = train_y[np.argmin(((x[:, None] - train_x[None]) ** 2).sum(-1), axis=1)]
  monkeypatch.setattr(baselines, "_NN_BLOCK", 2 * 50)  # 2 rows of x per block
  np.testing.assert_array_equal(baselines.nearest_neighbour(train_x, train_y, x), whole)


def test_nearest_neighbour_is_exact_where_the_matrix_product_rounds():
  """Every value on float32's grid near 1000, so the differences are exact. (a) Each row of x is
  exactly as far from two train rows, x - e and x + e: the first wins, though the matrix-product
  form of the distances alone rounds the two apart and picks the second for some rows (checked).
  (b) x + f is one grid step squared farther than x + e and comes first: it loses, though the two
  are closer than the product form's rounding."""
  rng = np.random.default_rng(0)
  unit = 2.0**-14  # float32's spacing in [512, 1024)
  x = (1000 + rng.integers(0, 2**13, (20, 784)) * unit).astype(np.float32)
  e = rng.integers(-20, 21, (20, 784)) * unit
  e[:, 0] = 0
  f = e.copy()
  f[:, 0] = unit
  first = np.arange(20)
  ties = np.concatenate([x - e, x + e]).astype(np.float32)  # rows i and 20 + i tie for x[i]
  d = ((x[:, None] - ties[None]) ** 2).sum(-1)
  assert np.all(d[first, first] == d[first, first + 20])  # the ties are exact
  t, q = ties.astype(np.float64), x.astype(np.float64)
  rounded = (q * q).sum(-1)[:, None] - 2 * q @ t.T + (t * t).sum(-1)
  assert np.any(np.argmin(rounded, -1) != first)  # so the tie-break is not the product's luck
  np.testing.assert_array_equal(baselines.nearest_rows(ties, x), first)
  near = np.concatenate([x + f, x + e]).astype(np.float32)
  np.testing.assert_array_equal(baselines.nearest_rows(near, x), first + 20)


def test_a_baseline_cell_of_a_multitask_config_scores_every_classification_task(tmp_path):
  """experiments.cell --kind=baseline on a multitask config: one accuracy per multiclass or binary
  task, named as the multitask evaluator names them, each on its own feature (multilabel and
  regression tasks have none)."""
  from experiments import cell
  from experiments.configs import multitask_digits
  config = multitask_digits.get_config("data=attributes")
  row = cell.write_baseline(config, str(tmp_path / "nn"), "pixels_1nn")
  features = {"class": "label", "parity": "parity", "ge5": "ge5"}
  expected = baselines.scores(config.data, ("pixels_1nn",), tuple(features.values()))
  assert row == {**{f"test/{t}/accuracy": expected[f]["pixels_1nn"] for t, f in features.items()},
                 "test/num_examples": 359}
  assert row["test/parity/accuracy"] != row["test/class/accuracy"]
