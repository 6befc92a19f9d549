"""Small, fast configs for trainer tests (the embedded digits, a few steps), and a few steps of the
real trainer on them."""
from __future__ import annotations

import itertools
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import pretrain_digits, transfer_digits
from jtl import data, train
from jtl.sharding import to_global


def digits_config(transfer_mode: str | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """pretrain_digits (or transfer_digits in `transfer_mode`) cut down to a few steps.

  `overrides` use flattened keys with '__' for '.', e.g. `mesh__axes=(('data', 1),)`.
  """
  if transfer_mode:
    config = transfer_digits.get_config(f"mode={transfer_mode},shots=5")
  else:
    config = pretrain_digits.get_config()
  config.total_steps = 20
  config.batch_size = 16
  config.log_every = 5
  config.checkpoint_every = 10
  config.model.widths = (8, 16)
  config.optim.warmup_steps = 2
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return config


def preempt_at(patch: pytest.MonkeyPatch, step: int) -> None:
  """Runs of `train.train` under `patch` get a real SIGTERM (a scheduler's preemption notice) while
  they run the step that ends at `step`: the loop then saves that step and stops, exactly as a
  preempted run does (jtl/signals.py, jtl/loop.py). Wraps the trainer's own `make_train_step`;
  `patch.undo()` (or the end of the test or `MonkeyPatch.context()`) removes it."""
  real_make_train_step = train.make_train_step

  def make_train_step(s):
    step_fn = real_make_train_step(s)

    def preempted_step(state, batch):
      if int(state.step) == step - 1:  # (read before the step: its state is donated)
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(state, batch)
    return preempted_step
  patch.setattr(train, "make_train_step", make_train_step)


def fixed_batch(config):
  return next(data.train_iterator(config.data, global_batch_size=config.batch_size, seed=123))


def steps_on(config, variables, num_steps=3):
  """`num_steps` trainer steps from `variables` (host arrays) on the config's mesh; returns the
  final (params, model_state, loss) on the host."""
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  first = next(batches)
  s = train.setup(config, first)
  if variables is None:
    variables = jax.device_get(train.fresh_variables(s))
  state = train.initial_state(s, *variables)
  step = train.make_train_step(s)
  for batch in itertools.islice(itertools.chain([first], batches), num_steps):
    state, metrics = step(state, to_global(batch, s.batch_sharding))
  return variables, jax.device_get((state.params, state.model_state, metrics["loss"]))


def loss_before_and_after(config, final_state):
  """The training loss (same batch, same rng) at the fresh init and at `final_state`."""
  s = train.setup(config, fixed_batch(config))
  batch = jax.device_put(fixed_batch(config))
  loss = jax.jit(lambda p, ms: s.objective.loss(p, ms, batch, jax.random.key(7),
                                            trainable=s.trainable)[0])
  fresh = train.fresh_variables(s)
  return fresh, float(loss(*fresh)), float(loss(final_state.params, final_state.model_state))


@pytest.fixture(scope="module", autouse=True)
def compile_fast():
  """XLA's `jax_disable_most_optimizations` for the module that imports it: these programs run a few steps
  on tiny shapes, so on 2 cores optimising them costs far more than running them. Both sides of
  every comparison compile alike; repeated programs (a resumed run's step, one init under two
  losses) come from the session's persistent compilation cache (tests/conftest.py)."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def assert_mesh_equals_one_device(config: ml_collections.ConfigDict, num_steps: int = 3) -> None:
  """`num_steps` trainer steps from the same variables on the config's mesh and on one device give
  the same loss, params and model state within 1e-5."""
  one_device = config.copy_and_resolve_references()
  one_device.mesh.axes = (("data", 1),)
  variables, sharded = steps_on(config, None, num_steps)
  _, one = steps_on(one_device, variables, num_steps)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def hand_split_metrics(model, variables: dict, data_config: ml_collections.ConfigDict,
                       split: str) -> tuple[float, float, int]:
  """(mean cross-entropy, accuracy, number of examples) of a classifier over a split's real examples,
  written independently of the evaluators: the whole split as one batch of exactly its size (so no
  padding at all), the model's logits, numpy in float64. `variables` = {'params': ..., ...}."""
  n = data.num_examples(data_config, split)
  make_batches, num_batches = data.eval_iterator(data_config, split=split, global_batch_size=n)
  assert num_batches == 1
  (batch,) = list(make_batches())
  assert batch["mask"].all() and len(batch["label"]) == n
  logits = np.float64(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                          batch["image"]))
  logits -= logits.max(axis=1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  labels = batch["label"]
  return (float(-log_p[np.arange(n), labels].mean()),
          float((logits.argmax(axis=1) == labels).mean()), n)
