"""Episodes (jtl/data/episodes.py) and the episodic evaluator (jtl/evaluators/episodic.py): classes
and examples drawn as specified, meta-train/meta-test disjoint, exact resume, and the evaluator's
accuracy and interval against plain references."""
from __future__ import annotations

import collections
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding

from experiments.configs.common import base_config
from jtl import data, sharding
from jtl.data import episodes
from jtl.errors import ConfigError
from jtl.evaluators import episodic

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def _config(episode=(3, 2, 3), **overrides):
  """A data config asking for `episode` = (ways, shots, queries) episodes, plus data overrides."""
  c = data.default_data_config()
  c.update(overrides)
  c.episodes.update(dict(zip(("ways", "shots", "queries"), episode)))
  return c


def _keys(images: np.ndarray) -> list[bytes]:
  """One key per image: its uint8 pixels (every digits image is distinct; normalize='unit')."""
  return [x.tobytes() for x in np.round(np.asarray(images) * 255).astype(np.uint8)]


@pytest.fixture(scope="module")
def raw():
  """{split: {image bytes: original digit}} straight from TFDS, independent of jtl's pipeline."""
  builder = data.get_builder(data.default_data_config())
  return {split: {ex["image"].tobytes(): int(ex["label"])
                  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}
          for split in ("train", "test")}


def test_every_class_and_example_drawn_as_specified(raw):
  ways, shots, queries, num = 3, 2, 3, 40
  c = _config((ways, shots, queries), labels=SOURCE)
  batches = data.train_iterator(c, global_batch_size=4, seed=5)  # dispatched on episodes.ways > 0
  seen_classes, label_of_class = collections.Counter(), collections.defaultdict(set)
  for batch in itertools.islice(batches, num // 4):
    assert batch["support"]["image"].shape == (4, ways * shots, 8, 8, 1)
    assert batch["query"]["image"].shape == (4, ways * queries, 8, 8, 1)
    assert batch["support"]["image"].dtype == np.float32
    assert batch["query"]["label"].dtype == np.int32
    for e in range(4):
      support, query = _keys(batch["support"]["image"][e]), _keys(batch["query"]["image"][e])
      assert len(set(support + query)) == ways * (shots + queries)  # all distinct: disjoint sets
      digit_of_label = {}
      for keys, labels, per_class in ((support, batch["support"]["label"][e], shots),
                                      (query, batch["query"]["label"][e], queries)):
        np.testing.assert_array_equal(labels, np.repeat(np.arange(ways), per_class))
        for key, label in zip(keys, labels):
          digit = raw["train"][key]  # a KeyError here: not an image of the train split
          assert digit_of_label.setdefault(int(label), digit) == digit  # one class per label
      assert len(set(digit_of_label.values())) == ways  # N distinct classes ...
      assert set(digit_of_label.values()) <= set(SOURCE)  # ... from the pool
      for label, digit in digit_of_label.items():
        seen_classes[digit] += 1
        label_of_class[digit].add(label)
  assert set(seen_classes) == set(SOURCE)  # every class is drawn ...
  assert all(len(labels) > 1 for labels in label_of_class.values())  # ... under varying labels


@pytest.mark.parametrize("rotations", [2, 4])
def test_rotations_add_each_class_turned_as_new_classes(raw, rotations):
  """data.episodes.rotations=R: R*C training classes, label by label one digit under one turn."""
  c = _config((10, 2, 2), labels=SOURCE)
  c.episodes.rotations = rotations
  turns = [r * 4 // rotations for r in range(rotations)]  # quarter turns, counter-clockwise
  seen = set()
  for batch in itertools.islice(data.train_iterator(c, global_batch_size=4, seed=0), 10):
    for e in range(4):
      for label in range(10):
        kinds = None  # the (digit, quarter turns) pairs every image of this label can be
        for part in ("support", "query"):
          rows = batch[part]["label"][e] == label
          for x in batch[part]["image"][e][rows]:
            can_be = {(raw["train"][k], t) for t in turns
                      for k in _keys(np.rot90(x, -t, axes=(0, 1))[None]) if k in raw["train"]}
            kinds = can_be if kinds is None else kinds & can_be
        assert len(kinds) == 1, kinds  # one digit under one turn per episode class
        seen |= kinds
  assert seen == {(d, t) for d in SOURCE for t in turns}  # every digit under every turn drawn


def test_rotations_need_square_images_and_a_divisor_of_four():
  c = _config()
  c.episodes.rotations = 3
  with pytest.raises(ConfigError, match="rotations must be 1, 2 or 4"):
    episodes.episode_spec(c)
  pool = episodes.ClassPool(np.zeros((4, 6, 8, 1), np.float32), np.array([0, 0, 1, 1]),
                            (np.array([0, 1]), np.array([2, 3])))
  with pytest.raises(ConfigError, match="needs square images; these are 6x8"):
    episodes.rotated_pool(pool, 4)


def test_meta_test_classes_are_never_seen_in_meta_training(raw):
  train_pool = episodes.class_pool(_config(labels=SOURCE), "train")
  test_pool = episodes.class_pool(_config(labels=TARGET), "test")
  spec = episodes.EpisodeSpec(5, 5, 15)
  support, query, classes = episodes.fixed_episodes(test_pool, spec, 50, seed=0)
  test_keys = set(_keys(test_pool.images[np.concatenate([support.ravel(), query.ravel()])]))
  assert {raw["test"][k] for k in test_keys} == set(TARGET)
  it = data.train_iterator(_config((5, 5, 15), labels=SOURCE), global_batch_size=8, seed=0)
  train_keys = set()
  for batch in itertools.islice(it, 10):
    for part in ("support", "query"):
      train_keys |= set(_keys(batch[part]["image"].reshape(-1, 8, 8, 1)))
  assert {raw["train"][k] for k in train_keys} == set(SOURCE)
  assert not train_keys & test_keys and not train_keys & set(raw["test"])
  assert sorted(np.unique(classes)) == list(range(5)) and len(train_pool.rows) == 5


def test_resume_mid_run_equals_uninterrupted_and_hosts_split_episodes():
  c = _config((5, 1, 2), labels=SOURCE)
  fresh = list(itertools.islice(data.train_iterator(c, global_batch_size=4, seed=3), 6))
  resumed = list(itertools.islice(data.train_iterator(c, global_batch_size=4, seed=3,
                                                      start_step=4), 2))
  for a, b in zip(fresh[4:], resumed):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  hosts = [next(data.train_iterator(c, global_batch_size=4, seed=3, start_step=1, process_index=h,
                                    process_count=2)) for h in range(2)]
  jax.tree.map(lambda whole, *parts: np.testing.assert_array_equal(whole, np.concatenate(parts)),
               fresh[1], *hosts)
  other = next(data.train_iterator(c, global_batch_size=4, seed=4))
  assert not np.array_equal(other["support"]["image"], fresh[0]["support"]["image"])
  assert not np.array_equal(fresh[1]["support"]["image"], fresh[0]["support"]["image"])


@pytest.mark.parametrize("episode, overrides, message", [
    ((6, 1, 2), dict(labels=SOURCE), "episodes need 6 classes but the pool has 5"),
    ((3, 3, 1), dict(labels=SOURCE, shots=3), r"shots \+ queries = 4"),
    ((1, 1, 2), {}, "ways to 2 or more"),
    ((3, 1, 0), {}, "data.episodes.queries must be an integer >= 1"),
    ((3, 1, 2), dict(augment=True), "not augmented"),
])
def test_bad_episode_config_raises_one_line(episode, overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    data.train_iterator(_config(episode, **overrides), global_batch_size=4, seed=0)
  assert "\n" not in str(e.value)


def test_unknown_episode_option_gets_a_did_you_mean():
  c = _config()
  c.episodes.wayz = 5
  with pytest.raises(ConfigError, match="did you mean 'ways'"):
    episodes.episode_spec(c)


# --- the episodic evaluator ---------------------------------------------------------------------


def test_prototype_accuracy_and_interval_against_plain_references():
  spec = episodes.EpisodeSpec(ways=3, shots=2, queries=4)
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(6), 10)  # 6 classes of 10 examples
  separable = np.eye(6)[labels] * 5.0 + rng.normal(size=(60, 6)) * 0.1
  pool = episodes.ClassPool(separable.astype(np.float32), labels,
                            tuple(np.flatnonzero(labels == k) for k in range(6)))
  support, query, _ = episodes.fixed_episodes(pool, spec, 30, seed=1)
  assert np.all(episodic.prototype_accuracy(separable, support, query, spec) == 1.0)
  noisy = rng.normal(size=(60, 5))
  got = episodic.prototype_accuracy(noisy, support, query, spec)
  expected = []  # the plain loop: prototypes, distances, argmin
  for s, q in zip(support, query):
    protos = [noisy[s[n * 2:(n + 1) * 2]].mean(0) for n in range(3)]
    predicted = [int(np.argmin([np.sum((noisy[r] - p)**2) for p in protos])) for r in q]
    expected.append(np.mean(np.array(predicted) == np.repeat(np.arange(3), 4)))
  np.testing.assert_allclose(got, expected)
  mean, ci95 = episodic.mean_and_ci95(got)
  assert mean == pytest.approx(np.mean(expected))
  assert ci95 == pytest.approx(1.96 * np.sqrt(np.mean((expected - np.mean(expected))**2) / 30))


class _PixelObjective:
  """`features` = the pixels; `episode_accuracy` = nearest prototype on the pixels, in jnp."""
  ways = 5

  def features(self, params, model_state, images):
    return images.reshape(images.shape[0], -1) * params["scale"]

  def episode_accuracy(self, params, model_state, batch):
    def one(support, query):
      protos = support["image"].reshape(5, -1, 64).mean(1)
      queries = query["image"].reshape(query["image"].shape[0], 64)
      d2 = jnp.sum((queries[:, None] - protos[None]) ** 2, -1)
      return jnp.mean(jnp.argmin(d2, -1) == query["label"])
    return jax.vmap(one)(batch["support"], batch["query"])


@pytest.mark.parametrize("method", ["prototypes", "adapt"])
def test_evaluator_on_eight_devices_matches_the_pixel_baseline(method):
  """Both paths (features + prototypes, the objective's own adaptation) through the real evaluator,
  sharded over 8 devices with a padded last batch, must give the pixel baseline's numbers."""
  config = base_config()
  config.batch_size = 8
  mesh = sharding.make_mesh(config.mesh)
  s = types.SimpleNamespace(config=config, objective=_PixelObjective(), mesh=mesh,
                            batch_sharding=NamedSharding(mesh, sharding.batch_spec(mesh)))
  evaluator = episodic.Episodic(s, "e", dict(type="episodic", data=dict(labels=TARGET), shots=1,
                                             num_episodes=30, method=method, pixel_baseline=True,
                                             tag="t"))
  out = dict(evaluator.run({"scale": jnp.ones(())}, {}))
  assert set(out) == {f"test/t/5way1shot_{k}" for k in ("accuracy", "ci95", "pixel_accuracy",
                                                         "pixel_ci95")}
  assert out["test/t/5way1shot_accuracy"] == pytest.approx(out["test/t/5way1shot_pixel_accuracy"])
  assert out["test/t/5way1shot_ci95"] == pytest.approx(out["test/t/5way1shot_pixel_ci95"])
  assert 0.5 < out["test/t/5way1shot_accuracy"] < 1.0 and out["test/t/5way1shot_ci95"] > 0


class _CountsSteps(_PixelObjective):
  """`episode_accuracy` = the adaptation steps it was given / 100 (0.5 without any)."""

  def episode_accuracy(self, params, model_state, batch, *, steps=None):
    return jnp.full(batch["query"]["label"].shape[:1], 0.5 if steps is None else steps / 100)


def test_adapt_steps_reach_the_objective_and_apply_to_adapt_only():
  config = base_config()
  mesh = sharding.make_mesh(config.mesh)

  def run(objective, **options):
    s = types.SimpleNamespace(config=config, objective=objective, mesh=mesh,
                              batch_sharding=NamedSharding(mesh, sharding.batch_spec(mesh)))
    e = episodic.Episodic(s, "e", dict(type="episodic", data=dict(labels=TARGET), num_episodes=16,
                                       batch_size=8, **options))
    return dict(e.run({"scale": jnp.ones(())}, {}))["test/5way1shot_accuracy"]

  assert run(_CountsSteps(), adapt_steps=7) == pytest.approx(0.07)
  assert run(_CountsSteps(), adapt_steps=0) == 0.0
  assert run(_CountsSteps()) == 0.5  # None: the objective's own number
  with pytest.raises(ConfigError, match="adapt_steps applies to method='adapt' only"):
    run(_CountsSteps(), adapt_steps=3, method="prototypes")
  with pytest.raises(ConfigError, match="episode_accuracy takes no `steps`; remove adapt_steps"):
    run(_PixelObjective(), adapt_steps=3)
  with pytest.raises(ConfigError, match="adapt_steps must be an integer >= 0 or None"):
    run(_CountsSteps(), adapt_steps=-1)


class _WeightedPixels:
  """Features: the pixels times a per-pixel weight (`params['w']`, [64])."""

  def features(self, params, model_state, images):
    return images.reshape(images.shape[0], -1) * params["w"]


def test_evaluators_of_one_pool_embed_it_once_per_checkpoint_and_never_reuse_stale_features():
  """5-way 1-shot and 3-way 5-shot on one pool: one pass over the pool per checkpoint, and each
  checkpoint's figures those of evaluators built afresh for it alone."""
  config = base_config()
  config.batch_size = 8

  def evaluators():
    mesh = sharding.make_mesh(config.mesh)
    s = types.SimpleNamespace(config=config, objective=_WeightedPixels(), mesh=mesh,
                              batch_sharding=NamedSharding(mesh, sharding.batch_spec(mesh)))
    return [episodic.Episodic(s, name, dict(type="episodic", data=dict(labels=TARGET), ways=ways,
                                            shots=shots, num_episodes=20, batch_size=64))
            for name, ways, shots in (("five", 5, 1), ("three", 3, 5))]

  shared = evaluators()
  assert shared[0].pool is shared[1].pool  # loaded once
  passes = []
  for evaluator in shared:
    run = evaluator._run
    evaluator._run = lambda *args, run=run: passes.append(1) or run(*args)
  per_pool = -(-len(shared[0].pool.images) // 64)  # forward passes over the whole pool
  checkpoints = [{"w": jnp.ones(64)}, {"w": jnp.arange(64.0) % 3}, {"w": jnp.ones(64)}]
  got = []
  for params in checkpoints:
    passes.clear()
    state = {}  # the restored model_state: one object for every evaluator of the checkpoint
    got.append([dict(e.run(params, state)) for e in shared])
    assert len(passes) == per_pool  # the second evaluator reuses the first one's features
  for params, row in zip(checkpoints, got):
    assert row == [dict(e.run(params, {})) for e in evaluators()]  # afresh, for this one only
  assert got[0] != got[1]  # the weights matter, so stale features would have shown
