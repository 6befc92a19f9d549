"""Transfer init: backbone loaded, head re-initialised, mismatches reported as one-line errors."""
import jax
import ml_collections
import numpy as np
import pytest

from jtl import checkpoint, data, train
from jtl.errors import ConfigError
from tests.helpers import digits_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  state = train.train(digits_config(total_steps=10), str(workdir))
  return str(workdir), jax.device_get(state)


def test_backbone_loaded_and_head_reinitialised(pretrained, tmp_path):
  workdir, source = pretrained
  config = digits_config("linear_probe", total_steps=4, init_from__workdir=workdir)
  state = jax.device_get(train.train(config, str(tmp_path)))
  # The backbone is frozen in a linear probe, so after training it still equals the checkpoint.
  for a, b in zip(jax.tree.leaves(source.params["backbone"]), jax.tree.leaves(state.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(source.model_state), jax.tree.leaves(state.model_state)):
    np.testing.assert_array_equal(a, b)


def test_init_loads_the_backbone_and_takes_the_head_from_the_fresh_init(pretrained):
  """What the trainer starts from: every backbone leaf from the checkpoint (not the fresh init), every
  head leaf from the fresh init (not the checkpoint)."""
  workdir, source = pretrained
  config = digits_config("finetune", init_from__workdir=workdir)
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  s = train.setup(config, next(batches))
  params, model_state = jax.device_get(train.init_variables(s, train.load_transfer_source(s)))
  fresh_params, fresh_state = jax.device_get(train.fresh_variables(s))
  for loaded, src, fresh in zip(jax.tree.leaves(params["backbone"]),
                                jax.tree.leaves(source.params["backbone"]),
                                jax.tree.leaves(fresh_params["backbone"])):
    np.testing.assert_array_equal(loaded, src)
    assert not np.array_equal(loaded, fresh)
  for loaded, src in zip(jax.tree.leaves(model_state), jax.tree.leaves(source.model_state)):
    np.testing.assert_array_equal(loaded, src)
  for loaded, src, fresh in zip(jax.tree.leaves(params["head"]), jax.tree.leaves(source.params["head"]),
                                jax.tree.leaves(fresh_params["head"])):
    np.testing.assert_array_equal(loaded, fresh)
    assert not np.array_equal(loaded, src)


def test_shape_mismatch_is_a_one_line_error_naming_paths(pretrained):
  workdir, source = pretrained
  wider = jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype), source.params)
  init_from = ml_collections.ConfigDict(dict(workdir=workdir, step=None, dont_load=("params/head/.*",)))
  with pytest.raises(ConfigError) as e:
    checkpoint.transfer_init(wider, source.model_state, init_from)
  message = str(e.value)
  assert "shape mismatch" in message and "params/backbone/" in message and "\n" not in message
  assert "dont_load" in message


def test_missing_checkpoint_is_a_config_error(tmp_path):
  init_from = ml_collections.ConfigDict(dict(workdir=str(tmp_path), step=None, dont_load=()))
  with pytest.raises(ConfigError, match="no checkpoint"):
    checkpoint.transfer_init({}, {}, init_from)
