"""The trainer: frozen-backbone cost and bit-identity, sharded == single device, exact resume."""
import itertools
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jtl import checkpoint, data, evaluate, masks, train
from jtl import config as config_lib
from jtl.metric_writer import read_jsonl
from jtl.sharding import prefetch_to_mesh, to_global
from tests.helpers import digits_config, preempt_at

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
  state = train.initial_state(s, *train.fresh_variables(s))  # the state the trainer really builds
  paths = masks.leaf_paths(state.opt_state, "opt_state")
  assert any("head" in p for p in paths)
  assert not any("backbone" in p for p in paths)
  n_head = sum(x.size for x in jax.tree.leaves(state.params["head"]))
  vectors = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # adam's mu and nu, no counts
  assert sum(x.size for x in vectors) == 2 * n_head


def test_grad_norm_and_clipping_see_only_trainable_gradients():
  """The trainer's grad_norm metric and its clipped update are those of the head's gradient alone,
  computed here independently; counting the (non-zero) frozen backbone gradient would change both."""
  config = digits_config(trainable=LINEAR_PROBE, optim__name="sgd", optim__lr=1.0,
                         optim__schedule="constant", optim__warmup_steps=0,
                         optim__weight_decay=0.0, optim__clip_norm=1e-3)
  s, batches = build(config)
  params, model_state = train.fresh_variables(s)
  # A random head (the default init is zeros), so the frozen backbone gets a real gradient.
  head = params["head"]["kernel"]
  params["head"]["kernel"] = jax.device_put(
      jax.random.normal(jax.random.key(3), head.shape), head.sharding)
  state = train.initial_state(s, params, model_state)
  batch = to_global(next(batches), s.batch_sharding)
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), 0)
  grads = jax.grad(lambda p: s.objective.loss(p, model_state, batch, rng, trainable=s.trainable)[0])(
      params)
  head_norm = float(optax.global_norm(grads["head"]))
  assert float(optax.global_norm(grads["backbone"])) > 0.1 * head_norm
  new_state, metrics = train.make_train_step(s)(state, batch)
  np.testing.assert_allclose(float(metrics["grad_norm"]), head_norm, rtol=1e-5)
  step = jax.tree.map(lambda a, b: a - b, jax.device_get(params["head"]),
                      jax.device_get(new_state.params["head"]))
  np.testing.assert_allclose(float(optax.global_norm(step)), 1e-3, rtol=1e-4)  # clipped to clip_norm
  expected = jax.tree.map(lambda g: g * 1e-3 / head_norm, grads["head"])
  for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-7)  # params minus params: f32 rounding


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
  preempt_at(monkeypatch, 10)
  train.train(config, str(tmp_path / "resumed"))
  assert checkpoint.completed_steps(tmp_path / "resumed") == [10]
  monkeypatch.undo()
  steps_run = []
  real_step = train.make_train_step
  def counting_step(s):
    step_fn = real_step(s)
    return lambda state, batch: (steps_run.append(int(state.step)), step_fn(state, batch))[1]
  monkeypatch.setattr(train, "make_train_step", counting_step)
  resumed = train.train(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == 20
  assert steps_run == list(range(10, 20))  # it resumed at 10: no step ran twice, none was skipped
  logged = [row["step"] for row in read_jsonl(tmp_path / "resumed" / "train_metrics.jsonl")]
  assert logged == [5, 10, 15, 20]
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)


def test_rerunning_a_finished_run_does_not_train_again(tmp_path):
  config = digits_config(total_steps=10)
  train.train(config, str(tmp_path))
  lines = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
  train.train(config, str(tmp_path))
  assert (tmp_path / "train_metrics.jsonl").read_text().splitlines() == lines


def test_a_finished_run_leaves_no_thread_or_pipeline_behind(tmp_path, monkeypatch):
  """Training data repeats, so every run ends before its data: the prefetch thread must stop and
  close the pipeline. (One leaked thread and pipeline per in-process run once piled up in a test
  worker.)"""
  opened, closed = [], []
  real = data.train_iterator

  def watched_iterator(*args, **kwargs):
    opened.append(True)
    def batches():
      try:
        yield from real(*args, **kwargs)
      finally:
        closed.append(True)
    return batches()
  monkeypatch.setattr(data, "train_iterator", watched_iterator)
  before = {t.ident for t in threading.enumerate()}
  train.train(digits_config(total_steps=4), str(tmp_path))
  assert [t.name for t in threading.enumerate() if t.ident not in before] == []
  assert opened and closed == opened


def test_prefetch_stops_when_its_consumer_closes():
  produced, closed = [], []

  def endless():
    try:
      for i in itertools.count():
        produced.append(i)
        yield {"x": np.full((8, 2), i, np.float32)}
    finally:
      closed.append(True)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  before = {t.ident for t in threading.enumerate()}
  batches = prefetch_to_mesh(endless(), NamedSharding(mesh, PartitionSpec("data")), size=2)
  assert [int(next(batches)["x"][0, 0]) for _ in range(3)] == [0, 1, 2]
  batches.close()
  assert [t.name for t in threading.enumerate() if t.ident not in before] == []
  assert closed == [True]
  assert len(produced) <= 3 + 2 + 1  # what was taken, the buffer, and the one the producer held


def test_sigint_saves_a_checkpoint_stops_and_gives_the_signal_back(tmp_path, monkeypatch):
  """A real SIGINT (Ctrl-C) to this process mid-run: the loop saves the current step and returns
  normally (no KeyboardInterrupt), and the caller's own handler is back afterwards."""
  before = signal.getsignal(signal.SIGINT)
  real_step = train.make_train_step

  def interrupting_step(s):
    step_fn = real_step(s)
    def step(state, batch):
      if int(state.step) == 6:
        os.kill(os.getpid(), signal.SIGINT)
      return step_fn(state, batch)
    return step
  monkeypatch.setattr(train, "make_train_step", interrupting_step)
  state = train.train(digits_config(total_steps=20, checkpoint_every=100), str(tmp_path))
  assert int(state.step) == 7
  assert checkpoint.completed_steps(tmp_path) == [7]
  assert signal.getsignal(signal.SIGINT) is before


def test_the_host_runs_at_most_two_steps_ahead_of_the_devices(tmp_path, monkeypatch):
  """JAX dispatches steps without waiting for them; unchecked, the loop ran up to `log_every` steps
  ahead, and a preemption's SIGTERM then waited for all of those before the save (70-80 s measured on
  a slow CPU run). Here each step's metrics pass through a host callback that takes 30 ms on the
  device side and counts: when the host dispatches a step, at most two earlier ones are unfinished."""
  real_step = train.make_train_step
  finished, gaps = [], []

  def counted(x):
    time.sleep(0.03)
    finished.append(1)
    return x

  @jax.jit
  def through_callback(loss):
    return jax.pure_callback(counted, jax.ShapeDtypeStruct((), loss.dtype), loss)

  def slow_step(s):
    step_fn = real_step(s)
    dispatched = []

    def step(state, batch):
      dispatched.append(1)
      gaps.append(len(dispatched) - 1 - len(finished))  # earlier steps still running
      state, metrics = step_fn(state, batch)
      loss = jax.device_put(metrics["loss"], jax.devices()[0])
      return state, {**metrics, "loss": through_callback(loss)}
    return step
  monkeypatch.setattr(train, "make_train_step", slow_step)
  train.train(digits_config(total_steps=30, log_every=30, checkpoint_every=100), str(tmp_path))
  assert len(gaps) == 30 and max(gaps) <= 2, gaps


def test_workdir_holds_what_the_readme_promises(tmp_path):
  config = digits_config(total_steps=10, checkpoint_every=5, trainable=LINEAR_PROBE)
  train.train(config, str(tmp_path))
  evaluate.evaluate_checkpoints(None, str(tmp_path))  # from the run's own config.json
  # config.json: the resolved config, equal to the one given.
  assert config_lib.differences(config_lib.load_run_config(tmp_path), config) == []
  # params.json: the linear probe trains the head (16 features x 5 classes + 5 biases) only.
  s, _ = build(config)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
  counts = json.loads((tmp_path / "params.json").read_text())
  assert (counts["trainable"], counts["frozen"]) == (16 * 5 + 5, total - 85)
  assert counts["trainable_bytes"] == 4 * 85
  assert checkpoint.completed_steps(tmp_path) == [5, 10]
  assert [r["step"] for r in read_jsonl(tmp_path / "train_metrics.jsonl")] == [5, 10]
  assert [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")] == [5, 10]
  # TensorBoard event files with the same scalars.
  import tensorflow as tf
  for name, tag in (("train_metrics", "loss"), ("eval_metrics", "test/accuracy")):
    files = list((tmp_path / "tensorboard" / name).glob("events.out.tfevents.*"))
    assert files, name
    tags = {v.tag for f in files for e in tf.compat.v1.train.summary_iterator(str(f))
            for v in e.summary.value}
    assert tag in tags, (name, tags)
