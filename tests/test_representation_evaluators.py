"""Representation evaluators: kNN, linear probe, zero-shot and retrieval on constructed features
(against plain numpy references, also used by the end-to-end tests from checkpoints in
test_contrastive.py and test_clip.py), an objective stub for zero-shot, config errors."""
from __future__ import annotations

import itertools
import types

import jax
import numpy as np
import pytest

from jtl import evaluators
from jtl import text as tokenizer
from jtl.errors import ConfigError
from jtl.evaluators import representation as rep
from tests.helpers import compile_fast  # noqa: F401  (autouse: this module compiles fast)
from tests.helpers import digits_config


def clusters(seed, n_per_class, num_classes=5, dim=12, spread=0.1):
  """Well-separated Gaussian clusters around random unit directions (cosine-separable)."""
  rng = np.random.RandomState(seed)
  centres = np.random.RandomState(99).randn(num_classes, dim)
  labels = np.repeat(np.arange(num_classes), n_per_class)
  feats = centres[labels] + spread * rng.randn(len(labels), dim)
  return feats.astype(np.float32), labels.astype(np.int32)


# ---- plain numpy references ----------------------------------------------------------------------

def np_knn(train_x, train_y, x, k, temperature, num_classes):
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
  sims = unit(np.float64(x)) @ unit(np.float64(train_x)).T
  predictions = []
  for row in sims:
    top = np.argsort(-row, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for j in top:
      votes[train_y[j]] += np.exp(row[j] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


def np_ridge(train_x, train_y, x, l2, num_classes):
  mean, std = train_x.mean(0), train_x.std(0)
  std = np.where(std > 1e-6 * std.max(), std, 1.0)
  a, b = (np.float64(train_x) - mean) / std, (np.float64(x) - mean) / std
  targets = np.eye(num_classes)[train_y]
  gram = a.T @ a
  w = np.linalg.solve(gram + l2 * np.trace(gram) / len(gram) * np.eye(len(gram)),
                      a.T @ (targets - targets.mean(0)))
  return np.argmax(b @ w + targets.mean(0), axis=1)


def np_zero_shot(image_emb, class_text_emb):
  """Class of highest cosine similarity to the renormalised mean of each class's unit prompts."""
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  classes = unit(unit(np.float64(class_text_emb)).mean(axis=1))
  return np.argmax(unit(np.float64(image_emb)) @ classes.T, axis=1)


def np_recall(query, gallery, relevant, k):
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
  sims = unit(np.float64(query)) @ unit(np.float64(gallery)).T
  return np.mean([np.any(relevant[i, np.argsort(-sims[i], kind="stable")[:k]])
                  for i in range(len(query))])


# ---- on constructed features ---------------------------------------------------------------------

def test_knn_and_probes_are_right_on_a_separable_set_and_match_references_on_noise():
  train_x, train_y = clusters(0, 4)
  x, y = clusters(1, 20)
  assert rep.knn_accuracy(train_x, train_y, x, y, num_classes=5, k=20) == 1.0  # k capped at 20
  for method in ("ridge", "softmax"):
    assert rep.linear_probe_accuracy(train_x, train_y, x, y, num_classes=5, method=method) == 1.0
  # Overlapping clusters: the accuracy is neither 0 nor 1, and equals the references'.
  train_x, train_y = clusters(2, 8, spread=2.0)
  x, y = clusters(3, 30, spread=2.0)
  for k in (1, 7):
    expected = np.mean(np_knn(train_x, train_y, x, k, 0.07, 5) == y)
    assert 0.2 < expected < 0.95
    assert rep.knn_accuracy(train_x, train_y, x, y, num_classes=5, k=k) == pytest.approx(expected)
  expected = np.mean(np_ridge(train_x, train_y, x, 1e-3, 5) == y)
  assert rep.linear_probe_accuracy(train_x, train_y, x, y, num_classes=5) == pytest.approx(expected)


class DigitWordTextTower:
  """Objective stub: its text tower embeds a caption as the one-hot of the digit it names (with
  `shift`, a wrong tower: digits 5-9 are rolled by `shift` among themselves); its prompts are the
  real held-out templates."""

  def __init__(self, shift=0):
    self.shift = shift
    self.prompt_tokens = lambda classes: np.swapaxes(
        tokenizer.caption_table(tokenizer.HELD_OUT_TEMPLATES, classes, 8), 0, 1)

  def embed_text(self, params, model_state, tokens):
    del params, model_state
    word_ids = np.array([tokenizer.VOCAB.index(w) for w in tokenizer.NUMBER_WORDS])
    numeral_ids = np.array([tokenizer.VOCAB.index(str(d)) for d in range(10)])
    names = (tokens[:, :, None] == word_ids) | (tokens[:, :, None] == numeral_ids)  # [B, L, 10]
    one_hot = names.any(axis=1).astype(np.float32)
    rolled = jax.numpy.roll(one_hot[:, 5:], self.shift, axis=1)
    return jax.numpy.concatenate([one_hot[:, :5], rolled], axis=1)


def test_zero_shot_and_retrieval_through_a_text_tower_that_names_the_class():
  classes = (5, 6, 7, 8, 9)
  labels = np.repeat(np.arange(5), 6)
  rng = np.random.RandomState(0)
  # Image i of class c embeds near the one-hot of its digit, classes[c].
  image_emb = np.eye(10)[np.asarray(classes)[labels]] + 0.2 * rng.rand(len(labels), 10)
  right = rep.class_text_embeddings(DigitWordTextTower(), None, None, classes)
  assert right.shape == (5, len(tokenizer.HELD_OUT_TEMPLATES), 10)
  assert rep.zero_shot_accuracy(image_emb, labels, right) == 1.0
  assert rep.retrieval_recalls(image_emb, labels, right) == {
      f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
  wrong = rep.class_text_embeddings(DigitWordTextTower(shift=1), None, None, classes)
  assert rep.zero_shot_accuracy(image_emb, labels, wrong) == 0.0

  # Random embeddings (the shapes above: no new compiles): zero-shot and recall (both directions)
  # against the plain references.
  image_emb, text = rng.randn(30, 10), rng.randn(5, 4, 10)
  assert rep.zero_shot_accuracy(image_emb, labels, text) == pytest.approx(
      np.mean(np_zero_shot(image_emb, text) == labels))
  recalls = rep.retrieval_recalls(image_emb, labels, text)
  relevant = labels[:, None] == np.repeat(np.arange(5), 4)[None, :]
  for k in (1, 5, 10):
    assert recalls[f"i2t_r{k}"] == pytest.approx(np_recall(image_emb, text.reshape(20, 10),
                                                           relevant, k))
    assert recalls[f"t2i_r{k}"] == pytest.approx(np_recall(text.reshape(20, 10), image_emb,
                                                           relevant.T, k))


def test_recall_chance_equals_the_mean_over_every_ranking():
  """Expected Recall@k of a random ranking against all 720 orders of a 6-item gallery, for queries
  with 1, 2 and 3 relevant items; retrieval_chance's two directions from the class counts."""
  orders = list(itertools.permutations(range(6)))
  for k in (1, 2, 4, 6):
    by_count = [np.mean([any(item < r for item in order[:k]) for order in orders])
                for r in (1, 2, 3)]  # items 0..r-1 are the relevant ones
    assert rep.recall_chance([1, 2, 3], 6, k) == pytest.approx(np.mean(by_count), abs=1e-12)
    assert rep.recall_chance([2], 6, k) == pytest.approx(by_count[1], abs=1e-12)
  # 3 images of class 0, 1 of class 1; 2 prompts a class: an image query has 2 relevant among 4
  # captions; a caption of class 0 (two of them) has 3 relevant among 4 images, of class 1 one.
  chance = rep.retrieval_chance(np.array([0, 0, 0, 1]), num_classes=2, num_prompts=2, ks=(1, 2))
  assert chance == pytest.approx({"i2t_r1": 2 / 4, "i2t_r2": 1 - 1 / 6,
                                  "t2i_r1": (3 / 4 + 3 / 4 + 1 / 4 + 1 / 4) / 4,
                                  "t2i_r2": (1 + 1 + 1 / 2 + 1 / 2) / 4})


@pytest.mark.parametrize("kind, missing", [
    ("knn", "features"), ("linear_probe", "features"),
    ("zero_shot", "embed_images, embed_text, prompt_tokens")])
def test_an_objective_without_the_method_is_a_config_error_naming_it(kind, missing):
  config = digits_config(evals={"e": {"type": kind}})
  setup = types.SimpleNamespace(config=config, objective=types.SimpleNamespace())
  with pytest.raises(ConfigError, match=missing):
    evaluators.build(setup)


def test_unknown_evaluator_option_is_a_config_error():
  config = digits_config(evals={"e": {"type": "knn", "kk": 3}})
  with pytest.raises(ConfigError, match="did you mean 'k'"):
    evaluators.build(types.SimpleNamespace(config=config, objective=None))
  config = digits_config(evals={"e": {"type": "linear_probe", "input": "pixel"}})
  with pytest.raises(ConfigError, match="input='pixel'; choose 'features'"):
    evaluators.build(types.SimpleNamespace(config=config, objective=None))


def test_collect_returns_the_real_examples_of_a_split_in_order_without_padding():
  """What kNN, probes, zero-shot and retrieval read: 180 test digits in batches of 16 (the last one
  holds 4 real rows and 12 padding rows), against the split read as one unpadded batch."""
  from jtl import data, train
  from jtl.evaluators import base
  config = digits_config()
  make_batches, _ = data.eval_iterator(config.data, split="test", global_batch_size=180)
  (whole,) = list(make_batches())
  assert whole["mask"].all()
  s = train.setup(config, {k: v[:16] for k, v in whole.items()})
  padded, num_batches = base.split_batches(s, config.data, "test", 16)
  assert num_batches == 12  # 11 full batches and 4 real examples
  out = base.collect(s, lambda batch: {"label": batch["label"],
                                       "ink": batch["image"].sum(axis=(1, 2, 3))}, padded)
  np.testing.assert_array_equal(out["label"], whole["label"])
  np.testing.assert_allclose(out["ink"], whole["image"].sum(axis=(1, 2, 3)), rtol=1e-5)
