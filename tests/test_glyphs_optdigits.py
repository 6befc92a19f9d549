"""`glyphs/optdigits` (jtl/data/glyphs.py): the glyphs' characters in the handwritten digits' format.

Cheap: a few renders and the builder's example list with the renderer stubbed out; nothing is built.
"""
from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jtl.data import glyphs

pytestmark = pytest.mark.xdist_group("glyphs")
LEVELS = np.round(np.arange(17) * 255 / 16)  # sklearn_digits' 17 pixel values, 0..16 on 0..255


def _listing(variant, monkeypatch) -> list[tuple]:
  """(split, label, code_point, font family, bold, italic, renderer) of every example of both splits,
  with both renderers replaced by stubs that say which one drew the example."""
  calls = []
  monkeypatch.setattr(glyphs, "render_instance",
                      lambda *a: calls.append("omniglot") or np.zeros((28, 28), np.uint8))
  monkeypatch.setattr(glyphs, "render_optdigits_instance",
                      lambda *a: calls.append("optdigits") or np.zeros((8, 8), np.int64))
  out = []
  for split in ("train", "test"):
    for example in glyphs.generate(split, variant):
      out.append((split, example["label"], example["code_point"], example["family"],
                  example["bold"], example["italic"], calls[-1], example["image"].shape))
  return out


def test_optdigits_draws_the_same_characters_in_the_handwritten_format(monkeypatch):
  # Format: 8x8 block counts 0..16 on sklearn_digits' 17-level grid, deterministic per generator.
  char = glyphs.characters()[0]
  examples = list(itertools.islice(glyphs.generate("train", glyphs.OPTDIGITS), 2 * glyphs.INSTANCES))
  spans = []
  for example in examples:
    image = example["image"]
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8
    assert np.isin(image, LEVELS).all(), np.unique(image)
    counts = np.round(image[..., 0] * 16 / 255)
    assert 0 < counts.sum() / 1024 < 0.6  # a glyph's ink, neither empty nor a filled box
    spans.append(np.ptp(np.nonzero(counts.sum(axis=1))[0]) + 1)
  # Height-normalised to the 32 px box like optdigits: ink in all 8 block rows (the box is measured
  # at half ink and the bitmap thresholded at 25-60%, so a hairline face may miss an end row).
  assert np.mean(np.equal(spans, 8)) >= 0.75, spans
  assert 0.15 < np.mean([e["image"] for e in examples]) / 255 < 0.45  # handwritten digits: 0.305
  draw = lambda seed: glyphs.render_optdigits_instance(char.fonts[1], char.code_point,
                                                       np.random.default_rng(seed))
  a, b, c = draw(0), draw(0), draw(1)
  assert a.shape == (8, 8) and a.min() >= 0 and a.max() <= 16 and a.max() > 8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # The same example list as the 28x28 default (characters, labels, fonts, in order), each drawn by
  # its own config's renderer; no class is a digit.
  opt, omni = _listing(glyphs.OPTDIGITS, monkeypatch), _listing(glyphs.OMNIGLOT, monkeypatch)
  assert [e[:6] for e in opt] == [e[:6] for e in omni]
  assert {e[6:] for e in opt} == {("optdigits", (8, 8, 1))}
  assert {e[6:] for e in omni} == {("omniglot", (28, 28, 1))}
  code_points = {e[2] for e in opt}
  assert len(code_points) == len(glyphs.characters())
  assert not any(unicodedata.category(chr(p)).startswith("N") for p in code_points)
  # The builder configs: `glyphs` is the 28x28 default, `glyphs/optdigits` stores 8x8 images.
  assert tfds.builder("glyphs").builder_config.name == "omniglot"
  info = tfds.builder("glyphs/optdigits").info
  assert info.features["image"].shape == (8, 8, 1)
  assert info.features["label"].num_classes == len(glyphs.characters())
