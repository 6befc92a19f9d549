"""Tests for the embedded offline builders printed_digits, multi_digits and digit_attributes."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jtl.data import attributes  # pylint: disable=unused-import  (registers the builder)
from jtl.data import digits
from jtl.data import multidigits
from jtl.data import printed_digits

tfds.disable_progress_bar()

NAMES = ("printed_digits", "multi_digits", "digit_attributes")
GRID = {round(k * 255 / 16) for k in range(17)}  # The 17 levels of sklearn_digits' pixels.


def _prepare(name: str, data_dir: str) -> dict[str, list[dict]]:
  """Builds `name` into `data_dir`; every example of every split, read back in TFDS order."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare()
  return {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
          for split in builder.info.splits}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
  data_dir = str(tmp_path_factory.mktemp("tfds_a"))
  return {name: _prepare(name, data_dir) for name in NAMES}


@pytest.fixture(scope="module")
def printed_again(tmp_path_factory) -> dict[str, list[dict]]:
  """A second preparation of the one builder with random pixels. (The other two are compared example
  by example with references rebuilt here from scikit-learn, so any two of their builds are equal.)"""
  return _prepare("printed_digits", str(tmp_path_factory.mktemp("tfds_b")))


def _stack(examples: list[dict], key: str) -> np.ndarray:
  return np.stack([ex[key] for ex in examples])


@pytest.fixture(scope="module")
def handwritten():
  """scikit-learn's digits as `sklearn_digits` stores them (uint8 images, labels): "all", by split."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  raw = load_digits()
  images = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
  out = {split: (images[idx], raw.target[idx]) for split, idx in digits.split_indices().items()}
  out["all"] = (images, raw.target)
  return out


def test_split_sizes(built):
  sizes = {name: {split: len(examples) for split, examples in splits.items()}
           for name, splits in built.items()}
  assert sizes == {"printed_digits": {"train": 2000, "test": 500},
                   "multi_digits": {"train": 6000, "test": 1500},
                   "digit_attributes": {"train": 1438, "test": 359}}


@pytest.mark.parametrize("name,spec", [
    ("printed_digits", {"image": (np.uint8, (8, 8, 1)), "label": (np.int64, ())}),
    ("multi_digits", {"image": (np.uint8, (12, 12, 1)), "left": (np.int64, ()),
                      "right": (np.int64, ())}),
    ("digit_attributes", {"image": (np.uint8, (8, 8, 1)), "label": (np.int64, ()),
                          "parity": (np.int64, ()), "ge5": (np.int64, ()),
                          "segments": (np.int32, (7,)), "ink": (np.float32, ())}),
])
def test_dtypes_and_shapes(built, name, spec):
  for examples in built[name].values():
    for key, (dtype, shape) in spec.items():
      values = _stack(examples, key)
      assert values.dtype == dtype and values.shape[1:] == shape, key
    assert set(examples[0]) == set(spec) | ({"font"} if name == "printed_digits" else set())


def test_two_preparations_are_identical(built, printed_again):
  for split, examples in built["printed_digits"].items():
    again = printed_again[split]
    assert len(examples) == len(again)
    for a, b in zip(examples, again):
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), split


def test_pair_plan_is_deterministic():
  for split in ("train", "test"):
    a, b = multidigits.pair_plan(split), multidigits.pair_plan(split)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_printed_pixels_labels_and_fonts(built):
  for split, examples in built["printed_digits"].items():
    images, labels = _stack(examples, "image"), _stack(examples, "label")
    assert set(np.unique(images).tolist()) <= GRID
    assert np.bincount(labels, minlength=10).tolist() == [len(examples) // 10] * 10  # Balanced.
    fonts = collections.Counter(ex["font"].decode() for ex in examples)
    assert set(fonts) == set(printed_digits.FONTS), split  # Every font in both splits.
    counts = np.round(images[..., 0].astype(np.float64) * 16 / 255)  # Back to on-pixels per block.
    on_pixels = counts.sum(axis=(1, 2))
    assert on_pixels.min() >= 240 and on_pixels.max() <= 400  # Stroke-normalised like optdigits.
    assert (counts.sum(axis=2) > 0).all()  # The glyph spans all 8 block rows, like the handwriting.
  train = _stack(built["printed_digits"]["train"], "image")
  test = _stack(built["printed_digits"]["test"], "image")
  assert len({x.tobytes() for x in train}) > 0.95 * len(train)  # Jitter really varies the images.
  assert len({x.tobytes() for x in test}) > 0.95 * len(test)


def test_printed_font_filter():
  assert set(printed_digits.usable_fonts()) == set(printed_digits.FONTS)
  assert not {"cmex10.ttf", "cmsy10.ttf", "cmmi10.ttf", "LastResortHE-Regular.ttf",
              "STIXSizOneSymReg.ttf"} & set(printed_digits.FONTS)


def test_printed_refuses_a_font_without_digits(monkeypatch):
  monkeypatch.setattr(printed_digits, "FONTS", ("DejaVuSans.ttf", "cmsy10.ttf"))
  with pytest.raises(RuntimeError, match="cmsy10"):
    printed_digits.check_fonts()


def _ridge_classifier(x: np.ndarray, y: np.ndarray, l2: float = 1.0):
  """A linear least-squares classifier on one-hot targets (closed form: fast and deterministic)."""
  x = np.concatenate([x, np.ones([len(x), 1])], axis=1)
  w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ np.eye(10)[y])
  return lambda z: np.argmax(np.concatenate([z, np.ones([len(z), 1])], axis=1) @ w, axis=1)


def test_printed_is_a_domain_shift_from_handwritten(built, handwritten):
  """Close in ink and layout; a linear classifier transfers well above chance, below in-domain."""
  flat = lambda x: x.reshape(len(x), -1) / 255.0
  train, test = built["printed_digits"]["train"], built["printed_digits"]["test"]
  x_train, y_train = flat(_stack(train, "image")), _stack(train, "label")
  x_hand, y_hand = flat(handwritten["test"][0]), handwritten["test"][1]
  assert abs(x_train.mean() - x_hand.mean()) < 0.02
  assert np.abs(x_train.mean(0) - x_hand.mean(0)).mean() < 0.1
  predict = _ridge_classifier(x_train, y_train)
  in_domain = (predict(flat(_stack(test, "image"))) == _stack(test, "label")).mean()
  across = (predict(x_hand) == y_hand).mean()
  hand_predict = _ridge_classifier(flat(handwritten["train"][0]), handwritten["train"][1])
  hand_in_domain = (hand_predict(x_hand) == y_hand).mean()
  assert in_domain > 0.95 and hand_in_domain > 0.9
  assert 0.3 < across < min(in_domain, hand_in_domain) - 0.15, (across, in_domain, hand_in_domain)


def _compose_plainly(left: np.ndarray, right: np.ndarray, left_at, right_at) -> np.ndarray:
  """Each digit zero-padded to 12x12 at its corner, then the element-wise max of the two."""
  placed = [np.pad(image, ((row, 4 - row), (col, 4 - col), (0, 0)))
            for image, (row, col) in ((left, left_at), (right, right_at))]
  return np.maximum(*placed)


@pytest.mark.parametrize("split", ["train", "test"])
def test_multi_digits_rebuilt_from_their_sources(built, handwritten, split):
  images, labels = handwritten["all"]
  plan = multidigits.pair_plan(split)
  assert set(plan["left_index"]) | set(plan["right_index"]) <= set(digits.split_indices()[split])
  assert (plan["left_index"] != plan["right_index"]).all()
  assert set(plan["left_corner"].ravel()) == {0, 1} and set(plan["right_corner"].ravel()) == {3, 4}
  expected = collections.Counter()
  for i in range(len(plan["left_index"])):
    left, right = plan["left_index"][i], plan["right_index"][i]
    image = _compose_plainly(images[left], images[right], plan["left_corner"][i],
                             plan["right_corner"][i])
    expected[image.tobytes(), labels[left], labels[right]] += 1
  got = collections.Counter((ex["image"].tobytes(), ex["left"], ex["right"])
                            for ex in built["multi_digits"][split])
  assert got == expected


def test_multi_digits_test_pairs_never_use_train_images():
  train, test = (multidigits.pair_plan(s) for s in ("train", "test"))
  used = lambda plan: set(plan["left_index"]) | set(plan["right_index"])
  assert not used(train) & used(test)
  assert not used(test) & set(digits.split_indices()["train"])


SEVEN_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg",
                  7: "abc", 8: "abcdefg", 9: "abcdfg"}


def test_attributes(built, handwritten):
  for split, examples in built["digit_attributes"].items():
    labels = _stack(examples, "label")
    assert set(labels.tolist()) == set(range(10))
    for ex in examples:
      label = int(ex["label"])
      assert "".join(s for s, on in zip("abcdefg", ex["segments"]) if on) == SEVEN_SEGMENTS[label]
      assert set(ex["segments"].tolist()) <= {0, 1}
      assert ex["parity"] == label % 2 and ex["ge5"] == (label >= 5)
      assert ex["ink"] == pytest.approx(ex["image"].astype(np.float64).mean() / 255, abs=1e-6)
    # Same images and labels as sklearn_digits' split.
    images, hand_labels = handwritten[split]
    assert (collections.Counter((ex["image"].tobytes(), int(ex["label"])) for ex in examples)
            == collections.Counter(zip((x.tobytes() for x in images), hand_labels.tolist())))


def test_elastic_variant_is_registered_and_closer_to_handwriting(handwritten):
  """`printed_digits/elastic` (the demo's pretraining data): 10,000 train examples, plain stays the
  default; on a subset of each (same fonts, same stream), a linear classifier trained on printed 5-9
  does better on handwritten 5-9 from the elastic images than from the plain ones."""
  assert tfds.builder("printed_digits").builder_config.name == "plain"
  elastic = tfds.builder("printed_digits/elastic").builder_config
  assert elastic.split_sizes() == {"train": 10000, "test": 500}
  hand_x, hand_y = handwritten["test"]
  keep = hand_y >= 5
  flat = lambda x: x.reshape(len(x), -1) / 255.0
  scores = {}
  for variant in (printed_digits.PLAIN, elastic):
    small = printed_digits.Variant(**{**vars(variant), "name": variant.name + "_small",
                                      "train_size": 1000})
    x, y, _ = printed_digits.generate("train", small)
    assert set(np.unique(x)) <= GRID and (np.bincount(y) == 100).all()
    high = y >= 5
    predict = _ridge_classifier(flat(x[high]), y[high])
    scores[variant.name] = (predict(flat(hand_x[keep])) == hand_y[keep]).mean()
  assert scores["elastic"] > scores["plain"] + 0.05, scores
