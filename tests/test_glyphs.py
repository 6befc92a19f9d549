"""The `glyphs` benchmark (jtl/data/glyphs.py): the protocol it promises, and that learning shows on it.

The builder's promises are checked on the class list and on renders (cheap). The learned-beats-pixels
tests build the dataset once (about a minute), then train from a random init for a fixed number of
steps, one per paradigm family: a ProtoNet (meta-learning), a linear probe on its encoder for unseen
characters (transfer), a SupCon encoder (contrastive), a two-task shared trunk (multitask). They fail
when a change silently breaks learning. Every test here shares one xdist group, so the dataset is
built by one worker only.
"""
from __future__ import annotations

import collections
import unicodedata

import ml_collections
import numpy as np
import pytest

from experiments.configs import maml_glyphs, multitask_glyphs, protonet_glyphs, represent_glyphs
from jtl import baselines, evaluate, train
from jtl.data import glyphs
from jtl.errors import ConfigError
from jtl.objectives import labels

pytestmark = pytest.mark.xdist_group("glyphs")
MARGIN = 0.15  # accuracy points; measured (one device, seed 0): see each test
UNSEEN_WAYS = 20  # evaluation characters of the transfer check
MT_STEPS = 150  # the multitask check's training steps


def test_classes_follow_the_omniglot_protocol():
  chars = glyphs.characters()
  scripts = collections.Counter(c.script for c in chars)
  assert len(chars) >= 1500 and len(scripts) >= 15, (len(chars), scripts)
  assert set(glyphs.BACKGROUND).isdisjoint(glyphs.EVALUATION)
  assert set(scripts) == set(glyphs.BACKGROUND) | set(glyphs.EVALUATION)
  # Background classes first, labels 0..C-1 in order, code points unique.
  assert [c.label for c in chars] == list(range(len(chars)))
  first_eval = min(c.label for c in chars if c.script in glyphs.EVALUATION)
  assert first_eval == represent_glyphs.NUM_BACKGROUND_CLASSES  # the supervised head's classes
  assert all(c.script in glyphs.BACKGROUND for c in chars[:first_eval])
  assert len({c.code_point for c in chars}) == len(chars)
  # No digit of any script is a class.
  assert not any(unicodedata.category(chr(c.code_point)).startswith("N") for c in chars)
  assert not {ord(str(d)) for d in range(10)} & {c.code_point for c in chars}
  assert all(0 in c.fonts for c in chars)  # the reference face draws every class


def test_no_two_classes_and_no_digit_share_a_shape():
  """Deduplication: the reference renders of all classes and of the digits 0-9 are pairwise different
  after cropping to the ink and resizing to 12x12 (so Latin A / Greek Alpha / Cyrillic A are one
  class, and an evaluation class is never a background shape)."""
  keys = [glyphs._shape_key(glyphs._render(0, chr(c.code_point))) for c in glyphs.characters()]
  digits = [glyphs._shape_key(glyphs._render(0, str(d))) for d in range(10)]
  assert None not in keys
  assert len(set(keys)) == len(keys)
  assert not set(keys) & set(digits)


def test_instances_are_deterministic_distinct_and_inked():
  char = glyphs.characters()[0]
  draw = lambda seed: [glyphs.render_instance(f, char.code_point, np.random.default_rng(seed))
                       for f in char.fonts[:4]]
  a, b, c = draw(0), draw(0), draw(1)
  for x, y, z in zip(a, b, c):
    assert x.shape == (28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, y)  # same generator state -> same pixels
    assert not np.array_equal(x, z)  # another draw -> another distortion
    ink = (x > 0).mean()
    assert 0.03 < ink < 0.6, ink  # a glyph, neither empty nor a filled square
    rows, cols = np.nonzero(x)
    assert np.ptp(rows) >= 14 or np.ptp(cols) >= 14  # scaled up to fill most of the box


def _short_run(config, steps, batch_size, lr, warmup, initial):
  """`config` as a learning check: `steps` steps of `batch_size`, one checkpoint at the end (and at
  step 0 if `initial`), on one device: a learning check, not a sharding one (8-device == 1-device is
  tested elsewhere), and 8 fake devices on 2 busy cores only make it slower."""
  config.total_steps, config.batch_size, config.checkpoint_every = steps, batch_size, steps
  config.log_every, config.mesh.axes, config.checkpoint_initial = steps, (("data", 1),), initial
  config.optim.lr, config.optim.warmup_steps = lr, warmup


def _learn(config, workdir, steps, batch_size):
  """Trains `config` for `steps` steps of `batch_size` from a random init (checkpointed at step 0,
  a baseline of its own) and scores steps 0 and `steps` on 200 fixed 5-way 1-shot episodes of the
  evaluation scripts, with the raw-pixel baseline: {step: metrics}."""
  _short_run(config, steps, batch_size, lr=2e-3, warmup=10, initial=True)
  config.evals = protonet_glyphs.glyph_episodic_evals(num_episodes=200, episodes=((5, 1),))
  train.train(config, workdir)
  rows = evaluate.evaluate_checkpoints(config, str(workdir))
  return {row["step"]: row for row in rows}


def _probe_unseen_characters(encoder_run, step, workdir):
  """Transfer: a 20-way linear probe (a new head; the encoder of `encoder_run` at `step` loaded and
  frozen) trained on one instance of each of the first 20 evaluation characters, for 50 steps, and
  scored on their 19 other instances ('rest' of the test split); the raw-pixel classifiers fitted on
  the same 20 instances beside it. (probe accuracy, {baseline: accuracy})."""
  config = represent_glyphs.get_config("method=supervised")
  first = represent_glyphs.NUM_BACKGROUND_CLASSES
  config.data.train_split, config.data.eval_split, config.data.shots = "test", "rest", 1
  config.data.labels = list(range(first, first + UNSEEN_WAYS))
  config.model.num_classes = UNSEEN_WAYS
  config.init_from.workdir, config.init_from.step = str(encoder_run), step
  config.trainable = (("params/head/.*", True), (".*", False))
  _short_run(config, 50, UNSEEN_WAYS, lr=1e-2, warmup=5, initial=False)
  config.evals = ml_collections.ConfigDict()  # the objective's accuracy on the eval split
  train.train(config, workdir)
  [row] = evaluate.evaluate_checkpoints(config, str(workdir))
  return row["rest/accuracy"], baselines.scores(config.data)["label"]


def _assert_learned(run, steps):
  init, trained = run[0], run[steps]
  pixels = trained["test/5way1shot_pixel_accuracy"]
  assert 0.35 < pixels < 0.6, pixels  # the baseline itself is what the protocol gives
  assert init["test/5way1shot_pixel_accuracy"] == pixels  # the same fixed episodes at every step
  learned = trained["test/5way1shot_accuracy"]
  assert learned >= pixels + MARGIN, (learned, pixels)
  assert learned >= init["test/5way1shot_accuracy"] + MARGIN, (learned, init)


@pytest.fixture(scope="module")
def proto(tmp_path_factory):
  """A ProtoNet meta-trained on the background scripts for 100 steps of 4 5-way 1-shot episodes
  (8 episodes a step: +5 points, twice the time): (its workdir, with checkpoints at steps 0 and 100;
  {step: metrics})."""
  workdir = tmp_path_factory.mktemp("proto_glyphs")
  return workdir, _learn(protonet_glyphs.get_config("ways=5,shots=1,queries=5"), workdir, steps=100,
                         batch_size=4)


def test_data_of_the_run_is_the_benchmark(proto):
  from jtl import data
  assert data.num_examples(protonet_glyphs.get_config().data, "test") == (
      glyphs.INSTANCES * sum(c.script in glyphs.EVALUATION for c in glyphs.characters()))


def test_protonet_beats_raw_pixels_and_its_init_on_unseen_scripts(proto):
  """The check that fails when learning silently breaks: after 100 steps a ProtoNet's 5-way 1-shot
  accuracy on scripts it never saw is well above nearest prototypes on raw pixels and on the features
  of its own random init (step 0). Measured: 0.740 against 0.485 and 0.404. With learning removed (lr
  1e-9) it reads 0.454 against 0.485 for pixels and 0.40 for the init (BatchNorm statistics still
  move), and fails."""
  _assert_learned(proto[1], 100)


def test_a_probe_on_the_meta_trained_encoder_beats_raw_pixels_on_unseen_characters(proto, tmp_path):
  """Transfer's check: the encoder above, loaded through `init_from` and frozen, under a new 20-way
  head trained on one instance per character of unseen scripts. Measured: 0.463 against 0.263 (1-NN)
  and 0.239 (logistic regression) on raw pixels, and 0.082 on the encoder's random init (step 0 of
  the same run). With the loaded weights dropped by `init_from` (mutation
  `transfer-init-loads-nothing`) the probe reads the random init's features, and the test fails."""
  learned, pixels = _probe_unseen_characters(proto[0], 100, tmp_path / "probe")
  at_init, same_pixels = _probe_unseen_characters(proto[0], 0, tmp_path / "probe_init")
  assert pixels == same_pixels and 0.15 < max(pixels.values()) < 0.4, pixels
  assert learned >= max(pixels.values()) + MARGIN, (learned, pixels)
  assert learned >= at_init + MARGIN, (learned, at_init)


def test_supcon_features_beat_raw_pixels_and_their_init_on_unseen_scripts(tmp_path):
  """Contrastive learning's check: SupCon on class-balanced batches of the background scripts (80
  steps of 16 characters x 4 images, glyph views), then nearest prototypes on its frozen features.
  Measured: 0.670 against 0.485 for pixels and 0.404 for the init (70 steps: 0.649, too close to
  the margin; 100 steps: 0.685 to 0.702 on two machines). With learning removed (lr 1e-9, 100
  steps) it reads 0.454, and fails."""
  run = _learn(represent_glyphs.get_config("method=supcon"), tmp_path, steps=80, batch_size=64)
  _assert_learned(run, 80)


def test_a_shared_trunk_learns_the_font_tasks_beyond_raw_pixels(tmp_path):
  """Multitask's check: `multitask_glyphs.py` with its two font tasks (bold, italic: two heads on one
  trunk, equal weights), 150 steps of 64 images of the first 300 background characters, scored on
  their held-out instances ('rest') against a nearest neighbour on raw pixels fitted on the same
  training images. Measured: bold 0.835 and italic 0.653 against 0.705 and 0.555, from 0.507 and
  0.502 at the random init. Logistic regression on the pixels reads 0.738 and 0.624, so the margin
  over the stronger baseline is thinner (10 and 3 points); the full-length table is in
  docs/glyphs.md. With the learning rate at 1e-9 it reads 0.511 and 0.502, and the test fails."""
  config = multitask_glyphs.get_config("tasks=bold+italic")
  config.data.labels = list(range(300))
  _short_run(config, MT_STEPS, 64, lr=3e-3, warmup=10, initial=True)
  train.train(config, tmp_path)
  init, trained = evaluate.evaluate_checkpoints(config, str(tmp_path))
  pixels = baselines.scores(config.data, ("pixels_1nn",), features=("bold", "italic"))
  for task, margin in (("bold", 0.08), ("italic", 0.05)):
    learned, baseline = trained[f"rest/{task}/accuracy"], pixels[task]["pixels_1nn"]
    assert 0.5 < baseline < 0.75, (task, baseline)
    assert learned >= baseline + margin, (task, learned, baseline)
    assert learned >= init[f"rest/{task}/accuracy"] + margin, (task, learned, init)


def test_a_prepared_copy_is_opened_without_rendering_and_counts_what_the_rules_give():
  """The class counts of a prepared copy come from the files TFDS wrote (opening it must not render
  every candidate in every font: 5 s per process), and equal what `characters()` gives; an unprepared
  folder falls back to `characters()`."""
  from jtl import data
  prepared = data.get_builder(protonet_glyphs.get_config().data)  # prepared once per session
  glyphs.characters.cache_clear()
  builder = glyphs.Glyphs(config="omniglot", data_dir=prepared.data_dir_root)  # opened afresh
  assert builder.info.features["label"].num_classes == 1598
  assert (builder.split_label_bound("train"), builder.split_label_bound("test")) == (1238, 1598)
  assert glyphs.characters.cache_info().currsize == 0  # nothing rendered to learn that
  chars = glyphs.characters()
  assert (len(chars), sum(c.script in glyphs.BACKGROUND for c in chars)) == (1598, 1238)
  builder._data_dir = "/nonexistent/glyphs"
  assert builder._counts() == (1598, 1238)


def test_a_held_out_background_script_is_the_validation_set_and_never_trained_on():
  """`maml_glyphs.py:holdout=arabic`: meta-training reads every background character but the Arabic
  ones, whose 1- and 5-shot episodes (train split) are scored after 1, 3 and 10 adaptation steps;
  evaluation scripts are neither trained on nor scored."""
  config = maml_glyphs.get_config("holdout=arabic")
  chars = glyphs.characters()
  held = {c.label for c in chars if c.script == "arabic"}
  background = {c.label for c in chars if c.script in glyphs.BACKGROUND}
  assert len(held) == 108 and set(config.data.labels) == background - held
  assert config.data.train_split == "train"
  assert {name: (e.split, set(e.data.labels), e.shots, e.adapt_steps, e.tag) for name, e in
          config.evals.items()} == {f"holdout_{k}shot_{n}steps": ("train", held, k, n,
                                                                  f"holdout/{n}steps")
                                    for k in (1, 5) for n in (1, 3, 10)}
  default = maml_glyphs.get_config()  # the number the holdout chose, at 1 and 5 shots
  assert default.maml.eval_inner_steps == 10 and default.data.labels is None
  assert not {"adapt_steps"} & (set(default.evals.episodic_5way1shot)
                                | set(default.evals.episodic_5way5shot))
  with pytest.raises(ConfigError, match="holdout='lao' is not a background script"):
    maml_glyphs.get_config("holdout=lao")


def test_a_head_over_the_background_characters_fits_the_train_split():
  """The train split holds the background characters only (labels 0..1237): a cross-entropy head of
  1,238 outputs fits it, although the dataset has 1,598 classes; a smaller head is refused."""
  config = represent_glyphs.get_config("method=supervised")
  assert config.model.num_classes == represent_glyphs.NUM_BACKGROUND_CLASSES
  labels.check_head_fits_labels(config, config.model.num_classes)
  with pytest.raises(ConfigError, match="data has 1238 classes but model.num_classes=1000"):
    labels.check_head_fits_labels(config, 1000)
