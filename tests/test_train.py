"""The trainer: frozen-backbone cost and bit-identity, sharded == single device, exact resume."""
import itertools

import jax
import numpy as np
import pytest

from jtl import checkpoint, data, masks, train
from jtl.sharding import to_global
from tests.helpers import digits_config

LINEAR_PROBE = (("params/head/.*", True), (".*", False))


def build(config):
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  first = next(batches)
  return train.setup(config, first), itertools.chain([first], batches)


def compiled_flops(s):
  step = train.make_train_step(s)
  return step.lower(s.abstract_state, s.abstract_batch).compile().cost_analysis()["flops"]


def test_frozen_backbone_costs_less_than_half_the_flops():
  full, _ = build(digits_config(model__widths=(32, 64)))
  probe, _ = build(digits_config(model__widths=(32, 64), trainable=LINEAR_PROBE))
  ratio = compiled_flops(probe) / compiled_flops(full)
  assert ratio <= 0.5, ratio


def test_no_optimizer_state_for_frozen_params():
  s, _ = build(digits_config(trainable=LINEAR_PROBE))
  paths = masks.leaf_paths(s.abstract_state.opt_state, "opt_state")
  assert any("head" in p for p in paths)
  assert not any("backbone" in p for p in paths)


def test_frozen_params_and_batchnorm_statistics_are_bit_identical():
  s, batches = build(digits_config(trainable=LINEAR_PROBE))
  state = train.initial_state(s, *train.fresh_variables(s))
  before = jax.device_get((state.params, state.model_state))
  step = train.make_train_step(s)
  for batch in itertools.islice(batches, 5):
    state, _ = step(state, to_global(batch, s.batch_sharding))
  params, model_state = jax.device_get((state.params, state.model_state))
  assert model_state["batch_stats"], "cnn_small has BatchNorm"
  for a, b in zip(jax.tree.leaves(before[0]["backbone"]), jax.tree.leaves(params["backbone"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(model_state)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(before[0]["head"]["kernel"], params["head"]["kernel"])


def test_full_training_updates_batchnorm_statistics():
  s, batches = build(digits_config())
  state = train.initial_state(s, *train.fresh_variables(s))
  before = jax.device_get(state.model_state)
  state, _ = train.make_train_step(s)(state, to_global(next(batches), s.batch_sharding))
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.model_state)))]
  assert all(changed)


@pytest.mark.parametrize("trainable", [((".*", True),), LINEAR_PROBE])
def test_eight_device_step_equals_one_device_step(trainable):
  assert jax.device_count() == 8
  results = []
  for axes in ((("data", 8),), (("data", 1),)):
    s, batches = build(digits_config(mesh__axes=axes, trainable=trainable))
    assert s.mesh.size == axes[0][1]
    state = train.initial_state(s, *train.fresh_variables(s))
    step = train.make_train_step(s)
    for batch in itertools.islice(batches, 3):
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    results.append(jax.device_get((state.params, state.model_state, metrics["loss"])))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_resume_after_preemption_gives_identical_params(tmp_path, monkeypatch):
  config = digits_config(total_steps=20, checkpoint_every=100)
  straight = train.train(config, str(tmp_path / "straight"))

  # Preempt the second run at step 10 (the real save-on-signal path), then run the same command.
  monkeypatch.setattr(train._StopFlag, "should_stop", lambda self, step: step == 10)
  train.train(config, str(tmp_path / "resumed"))
  assert checkpoint.completed_steps(tmp_path / "resumed") == [10]
  monkeypatch.undo()
  resumed = train.train(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == 20
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)


def test_rerunning_a_finished_run_does_not_train_again(tmp_path):
  config = digits_config(total_steps=10)
  train.train(config, str(tmp_path))
  lines = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
  train.train(config, str(tmp_path))
  assert (tmp_path / "train_metrics.jsonl").read_text().splitlines() == lines
