"""jtl.memory: the activation estimate against XLA's own accounting, and the refusal it drives."""
import jax
import numpy as np
import pytest

from jtl import config as config_lib
from jtl import data, masks, memory, objectives, train
from jtl.errors import ConfigError
from tests.helpers import digits_config


def _compiled_temp_bytes(objective, config, batch):
  """XLA's temporary memory for the gradient of the loss on `batch` (one device): the independent
  reference the estimate is a lower bound of."""
  params, model_state = jax.eval_shape(objective.init, jax.random.key(0), batch)
  trainable = masks.trainable_mask(params, config.trainable)

  def grads(params, model_state, batch):
    return jax.grad(lambda p: objective.loss(p, model_state, batch, jax.random.key(0),
                                             trainable=trainable)[0])(params)
  compiled = jax.jit(grads).lower(params, model_state, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_estimate_is_a_tight_lower_bound_of_the_compiled_step():
  config = config_lib.prepare(digits_config(model__widths=(16, 32)))
  objective = objectives.build(config)
  small = next(data.train_iterator(config.data, global_batch_size=8, seed=0))
  per_example = memory.activation_bytes_per_example(objective, config, small)
  rows = 512
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype), small)
  compiled = _compiled_temp_bytes(objective, config, batch)
  # At most what XLA allocates (so a refusal is never wrong), and most of it (so it refuses what
  # cannot run): measured 0.78 of the compiled temporaries here, 0.93 with widths (32, 64, 128).
  assert 0.7 * compiled <= per_example * rows <= compiled, (per_example * rows, compiled)
  # The estimate is linear: about the same per example from a larger small batch (not exactly: on
  # CPU the 1-channel stem's channel padding is timed per input shape, cpu_ops.py, and a busy
  # machine can choose differently for 8 and 24 rows: 2% apart seen once).
  bigger = next(data.train_iterator(config.data, global_batch_size=24, seed=0))
  assert memory.activation_bytes_per_example(objective, config, bigger) == pytest.approx(
      per_example, rel=0.05)


def test_a_batch_past_the_free_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  """The refusal itself, with the free memory made small (a real batch past 19 GB would be slow to
  build if the check were broken)."""
  monkeypatch.setattr(memory, "available_bytes", lambda: (200_000, "test memory"))
  config = digits_config(total_steps=2, batch_size=64)
  with pytest.raises(ConfigError) as e:
    train.train(config, tmp_path / "run")
  message = str(e.value)
  assert message.startswith("batch_size=64 needs at least ") and "more than the 200 KB of test " \
      "memory" in message and "about " in message and "--config.grad_accum_steps" in message
  fits = int(message.split("(about ")[1].split(" fits")[0])
  assert 0 < fits < 64
  assert not (tmp_path / "run").exists()
  assert "per example x 64 examples at once" in message
  # Half the batch in each of 2 micro-batches halves what is held at once.
  with pytest.raises(ConfigError, match="per example x 32 examples at once"):
    train.train(digits_config(total_steps=2, batch_size=64, grad_accum_steps=2), tmp_path / "run")


def test_ordinary_batches_are_not_estimated(monkeypatch):
  """Batches whose input is small against the free memory skip the traces (every ordinary run)."""
  config = config_lib.prepare(digits_config())
  calls = []
  monkeypatch.setattr(memory, "check_batch_fits", lambda *a, **k: calls.append(a))
  memory.check_config(config)
  assert not calls
  monkeypatch.setattr(memory, "available_bytes", lambda: (10 ** 6, "test memory"))
  memory.check_config(config)
  assert len(calls) == 1
  assert np.isfinite(memory.INPUT_FACTOR)
