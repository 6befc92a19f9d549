"""Optimizer from config: schedules, decay mask, per-group LRs, value checks. (What the trainer's
optimizer sees — only trainable leaves, state and clipping included — is tested in test_train.py.)"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jtl import masks, optim
from jtl.errors import ConfigError

PARAMS = {"backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}


def cfg(**kw):
  c = optim.default_optim_config()
  c.update(kw)
  return c


def test_warmup_cosine_schedule():
  schedule = optim.make_schedule(cfg(lr=1.0, warmup_steps=10, schedule="cosine"), total_steps=110)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_step_schedule_fractions():
  schedule = optim.make_schedule(cfg(lr=1.0, schedule="steps", boundaries=(0.5,), decay_factor=0.1),
                                 total_steps=100)
  assert float(schedule(49)) == pytest.approx(1.0) and float(schedule(51)) == pytest.approx(0.1)


def test_weight_decay_skips_bias_by_default():
  mask = masks.trainable_mask(PARAMS, ".*")
  tx, _ = optim.build_optimizer(cfg(name="sgd", lr=1.0, schedule="constant", weight_decay=0.1),
                                PARAMS, mask, 10)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1)  # decayed
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)     # not decayed


def test_lr_mults_scale_updates():
  mask = masks.trainable_mask(PARAMS, ".*")
  c = cfg(name="sgd", lr=1.0, schedule="constant", weight_decay=0.0,
          lr_mults=(("params/backbone/.*", 0.1),))
  tx, _ = optim.build_optimizer(c, PARAMS, mask, 10)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["backbone"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0)


def test_bad_names_are_config_errors():
  mask = masks.trainable_mask(PARAMS, ".*")
  with pytest.raises(ConfigError, match="optim.name"):
    optim.build_optimizer(cfg(name="adagrad"), PARAMS, mask, 10)
  with pytest.raises(ConfigError, match="lr_mults rule"):
    optim.build_optimizer(cfg(lr_mults=(("params/nope/.*", 0.1),)), PARAMS, mask, 10)


@pytest.mark.parametrize("key, value", [("lr", 0.0), ("lr", -1.0), ("b2", 1.0), ("eps", 0.0),
                                        ("momentum", -0.1), ("clip_norm", 0.0), ("warmup_steps", -1),
                                        ("end_lr_factor", 1.5), ("weight_decay", -1e-4)])
def test_out_of_range_values_are_config_errors(key, value):
  mask = masks.trainable_mask(PARAMS, ".*")
  with pytest.raises(ConfigError, match=f"optim.{key}"):
    optim.build_optimizer(cfg(**{key: value}), PARAMS, mask, 10)
