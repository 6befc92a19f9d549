"""The objective interface's documented extension points, used by a second objective through the real
trainer: a dict batch of two parts, an extra learnable leaf outside the model, non-trained state, and an
override of `gradients` (here: per-part gradients combined by hand, as gradient surgery would)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jtl import checkpoint, data, losses, masks, models, train
from jtl.objectives import OBJECTIVES, Objective, apply_model
from jtl.sharding import to_global
from tests.helpers import digits_config


class TwoPartObjective(Objective):
  """CE on `batch['a']` plus CE on `batch['b']` with logits scaled by exp(params['log_scale']); a step
  counter in model_state; gradients as the sum of two separate per-part gradients."""

  def __init__(self, config):
    self.model = models.build(config.model)

  @classmethod
  def from_config(cls, config):
    return cls(config)

  def init(self, rng, batch):
    variables = self.model.init(rng, jnp.zeros_like(batch["a"]["image"][:1]), train=False)
    params = {"model": variables.pop("params"), "log_scale": jnp.zeros(())}
    return params, {"model": dict(variables), "calls": jnp.zeros((), jnp.int32)}

  def part_loss(self, params, model_state, part, rng, trainable, scale):
    logits, new_model_state = apply_model(self.model, params["model"], model_state["model"],
                                          part["image"], train=True, trainable=trainable["model"],
                                          rng=rng)
    logits = logits * (jnp.exp(params["log_scale"]) if scale else 1.0)
    return losses.softmax_cross_entropy(logits, part["label"]).mean(), new_model_state

  def loss(self, params, model_state, batch, rng, *, trainable):
    loss_a, state = self.part_loss(params, model_state, batch["a"], rng, trainable, False)
    loss_b, state = self.part_loss(params, {**model_state, "model": state}, batch["b"], rng,
                                   trainable, True)
    new_state = {"model": state, "calls": model_state["calls"] + 1}
    return loss_a + loss_b, (new_state, {"loss_a": loss_a, "loss_b": loss_b})

  def gradients(self, trainable_params, frozen_params, model_state, batch, rng, *, trainable):
    grads = []
    for name, scale in (("a", False), ("b", True)):
      def part(tp, name=name, scale=scale):
        return self.part_loss(masks.merge(tp, frozen_params), model_state, batch[name], rng,
                              trainable, scale)
      (loss, state), grad = jax.value_and_grad(part, has_aux=True)(trainable_params)
      grads.append(grad)
    combined = jax.tree.map(jnp.add, *grads)
    new_state = {"model": state, "calls": model_state["calls"] + 1}
    return combined, new_state, {"loss": loss}

  def eval_metrics(self, params, model_state, batch):
    logits, _ = apply_model(self.model, params["model"], model_state["model"], batch["image"],
                            train=False)
    return {"accuracy": losses.accuracy(logits, batch["label"])}


def two_part_batches(config):
  it = data.train_iterator(config.data, global_batch_size=config.batch_size * 2, seed=0)
  for batch in it:
    half = config.batch_size
    yield {"a": jax.tree.map(lambda x: x[:half], batch), "b": jax.tree.map(lambda x: x[half:], batch)}


def run(config, steps=3):
  batches = two_part_batches(config)
  first = next(batches)
  s = train.setup(config, first)
  state = train.initial_state(s, *train.fresh_variables(s))
  step = train.make_train_step(s)
  for batch in itertools.islice(itertools.chain([first], batches), steps):
    state, metrics = step(state, to_global(batch, s.batch_sharding))
  return s, state, metrics


def config_for(axes, **overrides):
  return digits_config(objective="two_part", mesh__axes=axes, **overrides)


def test_second_objective_through_the_trainer(monkeypatch, tmp_path):
  monkeypatch.setitem(OBJECTIVES, "two_part", TwoPartObjective)
  results = []
  for axes in ((("data", 8),), (("data", 1),)):
    s, state, metrics = run(config_for(axes))
    results.append(jax.device_get((state.params, state.model_state)))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # sharded == one device
  params, model_state = results[0]
  assert float(params["log_scale"]) != 0.0  # the extra leaf is trained
  assert int(model_state["calls"]) == 3  # non-trained state carried between steps
  assert "params/log_scale" in masks.leaf_paths(s.abstract_state.params)

  # The extra leaf is maskable like any other: frozen, it keeps its value and has no optimizer state.
  s, state, _ = run(config_for((("data", 8),), trainable=(("params/log_scale", False), (".*", True))))
  assert float(state.params["log_scale"]) == 0.0
  assert not any("log_scale" in p for p in masks.leaf_paths(state.opt_state, "opt_state"))

  # And checkpointed: a save/restore round trip gives the same tree.
  mgr = checkpoint.manager(tmp_path, async_save=False)
  checkpoint.save(mgr, 3, state, force=True)
  restored = checkpoint.restore(mgr, 3, {"params": s.abstract_state.params,
                                         "model_state": s.abstract_state.model_state})
  mgr.close()
  for name in ("params", "model_state"):
    for a, b in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(getattr(state, name))):
      np.testing.assert_array_equal(a, b)
