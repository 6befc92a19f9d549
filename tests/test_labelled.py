"""Scarce labels (`data.label_fraction`, jtl/data/labelled.py): which training rows keep a label, the
multitask loss over the rows that have one, the pixel baselines fitted on them, and the errors."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.configs import multitask_digits, multitask_glyphs, pretrain_digits
from experiments import evaluate as evaluate_entry
from experiments import train as train_entry
from jtl import baselines, data, objectives
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl
from tests.test_cli import MULTITASK, SMALL, run
from tests.test_multitask import prepared, small


def _digits(**data_overrides):
  """sklearn_digits, 8 training examples of each of its 10 classes, no augmentation."""
  c = data.default_data_config()
  c.update(dict(name="sklearn_digits", shots=8, **data_overrides))
  return c


def _epoch(c, seed=0):
  """The first epoch of training rows: one batch of the whole (in-memory, permuted) split."""
  n = data.num_examples(c, c.train_split)
  return next(data.train_iterator(c, global_batch_size=n, seed=seed))


def _true_labels(c, feature="label"):
  """{image bytes: its label} from the train split read for evaluation (every label kept)."""
  images, labels = baselines.examples(c, c.train_split, feature=feature)
  table = {}
  for x, y in zip(images, labels):
    table.setdefault(x.tobytes(), set()).add(int(y))
  return table


@pytest.mark.parametrize("fraction,per_class", [(0.25, 2), (0.3, 2), (0.01, 1), (1.0, 8)])
def test_each_class_keeps_its_fraction_of_training_labels_and_the_rest_read_missing(fraction, per_class):
  c = _digits(label_fraction={"label": fraction})
  batch = _epoch(c)
  labels = batch["label"]
  assert len(labels) == 80  # 10 classes x 8 shots
  for k in range(10):
    assert np.sum(labels == k) == per_class, (k, labels)
  assert np.sum(labels == -1) == 80 - 10 * per_class
  # A kept label is the example's own; evaluation reads every label of the same split.
  truth = _true_labels(c)
  for x, y in zip(batch["image"], labels):
    if y >= 0:
      assert truth[x.reshape(-1).tobytes()] == {int(y)}
  _, all_labels = baselines.examples(c, c.train_split)
  assert sorted(all_labels) == sorted(np.repeat(np.arange(10), 8))


def test_the_labelled_examples_do_not_depend_on_the_training_seed_but_on_shots_seed():
  def labelled_images(c, seed):
    batch = _epoch(c, seed)
    return {x.tobytes() for x, y in zip(batch["image"], batch["label"]) if y >= 0}
  c = _digits(label_fraction={"label": 0.25})
  assert labelled_images(c, 0) == labelled_images(c, 1)
  other = _digits(label_fraction={"label": 0.25}, shots_seed=3)
  assert labelled_images(c, 0) != labelled_images(other, 0)


def test_a_task_with_missing_labels_averages_its_error_over_the_rows_that_have_one():
  """The multitask loss against the formula by hand: the cross-entropy of `left` over the rows whose
  label is kept, `right` over every row, the total their equal-weight sum."""
  config = small("data=multidigits", mesh__axes=(("data", 1),))
  config.data.label_fraction = {"left": 0.25}
  s, params, model_state, batch = prepared(config)
  left, right = np.asarray(batch["left"]), np.asarray(batch["right"])
  assert 0 < np.sum(left >= 0) < len(left) and np.all(right >= 0)
  obj = s.objective
  outputs, _, _ = obj._apply(params, model_state, batch["image"], train=True,
                             rng=jax.random.key(0))
  def cross_entropy(logits, y):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -log_p[np.arange(len(y)), y]
  has = left >= 0
  want_left = cross_entropy(outputs["left"], np.maximum(left, 0))[has].mean()
  want_right = cross_entropy(outputs["right"], right).mean()
  total, (_, metrics) = obj.loss(params, model_state, batch, jax.random.key(0), trainable=s.trainable)
  np.testing.assert_allclose(metrics["left/loss"], want_left, rtol=1e-5)
  np.testing.assert_allclose(metrics["right/loss"], want_right, rtol=1e-5)
  np.testing.assert_allclose(total, want_left + want_right, rtol=1e-5)


def test_a_scarce_task_trains_from_the_cli_and_is_scored_on_every_test_label(tmp_path):
  status, errors = run(train_entry, f"--config={MULTITASK}:data=multidigits",
                       "--config.data.label_fraction={'left': 0.1}", *SMALL,
                       f"--workdir={tmp_path}")
  assert status == 0, errors
  status, errors = run(evaluate_entry, f"--workdir={tmp_path}")
  assert status == 0, errors
  [row] = [r for r in read_jsonl(tmp_path / "eval_metrics.jsonl") if r["step"] == 4]
  assert 0 <= row["test/left/accuracy"] <= 1 and 0 <= row["test/right/accuracy"] <= 1


def test_pixel_baselines_of_a_scarce_feature_fit_the_labelled_training_rows_only():
  c = multitask_digits.get_config("data=multidigits").data
  c.label_fraction = {"left": 0.05}
  batch = _epoch(c)
  flat = batch["image"].reshape(len(batch["image"]), -1)
  test_x, test_left = baselines.examples(c, c.eval_split, feature="left")
  _, test_right = baselines.examples(c, c.eval_split, feature="right")

  def one_nn(train_x, train_y):
    d = ((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
    return np.mean(train_y[np.argmin(d, axis=1)] == test_y)
  has = batch["left"] >= 0
  test_y = test_left
  want_left = one_nn(flat[has], batch["left"][has])
  test_y = test_right
  want_right = one_nn(flat, batch["right"])
  got = baselines.scores(c, ("pixels_1nn",), ("left", "right"))
  assert got["left"]["pixels_1nn"] == pytest.approx(want_left, abs=1e-9)
  assert got["right"]["pixels_1nn"] == pytest.approx(want_right, abs=1e-9)
  assert want_left < want_right - 0.05  # 300 labelled rows against 6,000: the difference shows


@pytest.mark.parametrize("change,message", [
    (dict(label_fraction={"label": 0.0}), "must be a number in (0, 1]"),
    (dict(label_fraction={"label": 1.5}), "must be a number in (0, 1]"),
    (dict(label_fraction={"label": 0.5}, cache=False), "set --config.data.cache=True"),
    (dict(label_fraction={"label": 0.5}, per_class=4), "set one of them off"),
    (dict(label_fraction={"colour": 0.5}), "has no class feature 'colour'"),
])
def test_bad_label_fractions_are_named(change, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    data.validate(_digits(**change))


def test_only_the_multitask_objective_reads_hidden_labels_and_only_for_class_tasks():
  config = pretrain_digits.get_config()
  config.data.label_fraction = {"label": 0.5}
  with pytest.raises(ConfigError, match="only the multitask objective skips"):
    objectives.build(config)
  config = multitask_digits.get_config("data=attributes")
  config.data.label_fraction = {"label": 0.5}
  config.tasks["class"].kind = "regression"
  config.tasks["class"].num_outputs = 1
  with pytest.raises(ConfigError, match="hides labels of multiclass and binary tasks only"):
    objectives.build(config)


def test_the_glyph_config_hides_the_scarce_task_s_feature():
  c = multitask_glyphs.get_config("tasks=character+script,scarce=character")
  assert c.data.label_fraction.to_dict() == {"label": 1 / 16}
  assert not multitask_glyphs.get_config().data.label_fraction
  with pytest.raises(ValueError, match="is not one of the tasks"):
    multitask_glyphs.get_config("tasks=script,scarce=character")
  c = multitask_glyphs.get_config("tasks=character+script,scarce=script,weighting=static,"
                                  "scarce_weight=0.25")
  assert objectives.build(c).weighting.weights == (1.0, 0.25)
  with pytest.raises(ValueError, match="set scarce=TASK and weighting=static"):
    multitask_glyphs.get_config("scarce=script,scarce_weight=0.25")
