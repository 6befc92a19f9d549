"""Mask semantics: fullmatch, first match wins, label trees, partition/merge, errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from jtl import masks
from jtl.errors import ConfigError

PARAMS = {
    "backbone": {"conv": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.zeros(4)},
                 "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
}


def test_paths_are_slash_joined_with_prefix():
  assert masks.leaf_paths(PARAMS) == [
      "params/backbone/bn/bias", "params/backbone/bn/scale", "params/backbone/conv/bias",
      "params/backbone/conv/kernel", "params/head/bias", "params/head/kernel"]


def test_fullmatch_not_search():
  # 'head' alone would match by re.search; fullmatch requires the whole path.
  with pytest.raises(ConfigError, match="matches no parameter"):
    masks.trainable_mask(PARAMS, [("head", True), (".*", False)])


def test_first_match_wins():
  mask = masks.trainable_mask(PARAMS, [("params/head/.*", True), ("params/.*/kernel", False),
                                       (".*", True)])
  assert mask["head"]["kernel"] and mask["head"]["bias"]
  assert not mask["backbone"]["conv"]["kernel"]
  assert mask["backbone"]["conv"]["bias"] and mask["backbone"]["bn"]["scale"]


def test_bare_pattern_means_only_that_trains():
  mask = masks.trainable_mask(PARAMS, "params/head/.*")
  assert masks.leaf_paths(masks.partition(PARAMS, mask)[0]) == ["params/head/bias",
                                                                 "params/head/kernel"]


def test_label_tree_with_default():
  labels = masks.match(PARAMS, [("params/backbone/.*", 0.1)], default=1.0)
  assert labels["backbone"]["conv"]["kernel"] == 0.1 and labels["head"]["kernel"] == 1.0


def test_unmatched_pattern_lists_nearby_paths():
  with pytest.raises(ConfigError) as e:
    masks.trainable_mask(PARAMS, [("params/haed/.*", True), (".*", False)])
  message = str(e.value)
  assert "params/haed/.*" in message and "params/head/" in message and "\n" not in message


def test_leaf_without_rule_is_an_error():
  with pytest.raises(ConfigError, match="no trainable rule matches"):
    masks.trainable_mask(PARAMS, [("params/head/.*", True)])


def test_partition_merge_roundtrip_and_no_frozen_leaves():
  mask = masks.trainable_mask(PARAMS, "params/head/.*")
  trainable, frozen = masks.partition(PARAMS, mask)
  assert set(trainable) == {"head"} and set(frozen) == {"backbone"}
  merged = masks.merge(trainable, frozen)
  for a, b in zip(masks.leaf_paths(merged), masks.leaf_paths(PARAMS)):
    assert a == b
  np.testing.assert_array_equal(merged["head"]["kernel"], PARAMS["head"]["kernel"])


def test_frozen_modules():
  mask = masks.trainable_mask(PARAMS, [("params/backbone/bn/bias", True), ("params/head/.*", True),
                                       (".*", False)])
  assert masks.frozen_modules(mask) == {"backbone/conv"}  # bn is partly trainable


def test_summary_counts():
  mask = masks.trainable_mask(PARAMS, "params/head/.*")
  table = masks.summary(PARAMS, mask)
  total = [line for line in table.splitlines() if line.startswith("total")][0].split()
  assert total[1] == "10" and total[3] == "48"  # head 4*2+2; backbone 36+4+4+4
