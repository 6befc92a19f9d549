"""Representation probes on constructed sets (exact answers) and against plain numpy references."""
from __future__ import annotations

import numpy as np
import pytest

from jtl import probes
from jtl.errors import ConfigError

C, D = 4, 6


def separable_set(seed, per_class):
  """Class c lies around 3 e_c (orthogonal directions, small noise): separable by angle and linearly."""
  rng = np.random.RandomState(seed)
  labels = np.repeat(np.arange(C), per_class)
  feats = 3.0 * np.eye(C, D)[labels] + 0.3 * rng.randn(len(labels), D)
  return feats.astype(np.float32), labels


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_knn(train, train_labels, query, num_classes, k, temperature):
  sims = np_normalize(query) @ np_normalize(train).T
  predictions = []
  for row in sims:
    nearest = np.argsort(-row)[:k]
    votes = np.zeros(num_classes)
    for j in nearest:
      votes[train_labels[j]] += np.exp(row[j] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


def np_ridge(feats, labels, num_classes, l2):
  feats = np.asarray(feats, np.float64)
  mean, std = feats.mean(0), feats.std(0)
  x = (feats - mean) / std
  y = np.eye(num_classes)[labels]
  gram = x.T @ x
  weights = np.linalg.solve(gram + l2 * np.trace(gram) / len(gram) * np.eye(len(gram)),
                            x.T @ (y - y.mean(0)))
  return mean, std, weights, y.mean(0)


def test_knn_and_ridge_are_perfect_on_a_separable_set():
  train, train_labels = separable_set(0, per_class=20)
  test, test_labels = separable_set(1, per_class=10)
  predicted = probes.knn_classify(train, train_labels, test, num_classes=C, k=5, chunk_size=16)
  np.testing.assert_array_equal(predicted, test_labels)
  probe = probes.ridge_probe_fit(train, train_labels, num_classes=C)
  np.testing.assert_array_equal(probes.ridge_probe_predict(probe, test), test_labels)


def test_knn_matches_numpy_reference_on_random_features():
  rng = np.random.RandomState(2)
  train, train_labels = rng.randn(60, D).astype(np.float32), rng.randint(0, 3, 60)
  query = rng.randn(37, D).astype(np.float32)  # 37 = 2 chunks of 16 + a padded one
  predicted = probes.knn_classify(train, train_labels, query, num_classes=3, k=7, temperature=0.1,
                                  chunk_size=16)
  expected = np_knn(train, train_labels, query, 3, k=7, temperature=0.1)
  assert predicted.shape == (37,)
  np.testing.assert_array_equal(predicted, expected)
  # The vote weights matter: with k = 7 a plain majority disagrees on some of these queries.
  assert np.any(expected != np_knn(train, train_labels, query, 3, k=7, temperature=1e3))


def test_ridge_matches_numpy_reference_and_is_scale_free():
  rng = np.random.RandomState(3)
  feats = (rng.randn(50, D) * rng.uniform(0.1, 10.0, D) + rng.randn(D)).astype(np.float32)
  labels = rng.randint(0, 3, 50)
  probe = probes.ridge_probe_fit(feats, labels, num_classes=3, l2=0.1)
  mean, std, weights, bias = np_ridge(feats, labels, 3, l2=0.1)
  np.testing.assert_allclose(probe.feature_mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probe.feature_scale, std, rtol=1e-5)
  np.testing.assert_allclose(probe.weights, weights, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(probe.bias, bias, rtol=1e-6)
  query = rng.randn(20, D).astype(np.float32)
  expected = np.argmax((query - mean) / std @ weights + bias, axis=1)
  np.testing.assert_array_equal(probes.ridge_probe_predict(probe, query), expected)
  # Rescaling and shifting the features (train and query alike) changes nothing.
  rescaled = probes.ridge_probe_fit(100.0 * feats + 5.0, labels, num_classes=3, l2=0.1)
  np.testing.assert_allclose(rescaled.weights, probe.weights, rtol=1e-3, atol=1e-5)


def test_zero_shot_with_a_text_tower_that_embeds_each_class_prompt():
  rng = np.random.RandomState(4)
  num_prompts = 3
  class_name_table = rng.randn(C, D)  # the fake text tower: name embedding + a small template offset
  template_table = 0.2 * rng.randn(num_prompts, D)

  def text_tower(class_index, template_index):
    return class_name_table[class_index] + template_table[template_index]

  class_text_emb = np.array([[text_tower(c, p) for p in range(num_prompts)] for c in range(C)])
  labels = np.repeat(np.arange(C), 5)
  images = class_name_table[labels] * rng.uniform(0.5, 3.0, (len(labels), 1))  # any image norm
  predicted = probes.zero_shot_classify(images.astype(np.float32), class_text_emb.astype(np.float32))
  np.testing.assert_array_equal(predicted, labels)


def test_zero_shot_normalizes_prompts_before_averaging():
  rng = np.random.RandomState(5)
  class_text_emb = rng.randn(C, 4, D) * np.exp(rng.uniform(-3, 3, (C, 4, 1)))  # wildly varying norms
  images = rng.randn(200, D)
  class_emb = np_normalize(np_normalize(class_text_emb).mean(1))
  expected = np.argmax(np_normalize(images) @ class_emb.T, axis=1)
  predicted = probes.zero_shot_classify(images.astype(np.float32), class_text_emb.astype(np.float32))
  np.testing.assert_array_equal(predicted, expected)
  unnormalized_mean = np.argmax(images @ class_text_emb.mean(1).T, axis=1)
  assert np.any(unnormalized_mean != expected)  # the check above can tell the difference


def test_retrieval_identical_embeddings_give_recall_at_1_of_one():
  gallery = np.random.RandomState(6).randn(30, D).astype(np.float32)
  recall = probes.retrieval_recall(gallery, gallery, np.eye(30, dtype=bool), ks=(1, 5))
  assert recall == {"recall@1": 1.0, "recall@5": 1.0}


def test_retrieval_recall_on_a_hand_made_case():
  def direction(degrees, norm=1.0):
    return norm * np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])

  # Gallery at 0, 10, 20, 30, 40 degrees; the norms would change the order under a raw dot product.
  gallery = np.stack([direction(a, n) for a, n in zip((0, 10, 20, 30, 40), (5, 1, 2, 1, 0.5))])
  query = np.stack([direction(0), direction(40), direction(20), direction(180)])
  relevant = np.zeros((4, 5), bool)
  relevant[0, 3] = True             # 30 deg: 4th most similar to 0 deg        -> hit from k = 4
  relevant[1, [0, 3]] = True        # from 40 deg: 40 first, then 30 (rank 2)  -> hit from k = 2
  relevant[3, 4] = True             # from 180 deg the nearest is 40 deg       -> hit from k = 1
  # query 2 has no relevant item: never a hit
  recall = probes.retrieval_recall(query.astype(np.float32), gallery.astype(np.float32), relevant,
                                   ks=(1, 2, 3, 4, 5))
  assert recall == {"recall@1": 0.25, "recall@2": 0.5, "recall@3": 0.5, "recall@4": 0.75,
                    "recall@5": 0.75}


def test_bad_input_raises_config_error():
  feats, labels = separable_set(0, per_class=2)
  with pytest.raises(ConfigError, match="k=20"):
    probes.knn_classify(feats, labels, feats, num_classes=C, k=20)
  with pytest.raises(ConfigError, match="l2"):
    probes.ridge_probe_fit(feats, labels, num_classes=C, l2=0.0)
  with pytest.raises(ConfigError, match="ks"):
    probes.retrieval_recall(feats, feats, np.eye(len(feats), dtype=bool), ks=(1, 10))
