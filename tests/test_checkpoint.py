"""Transfer init: backbone loaded, head re-initialised, mismatches reported as one-line errors."""
import jax
import ml_collections
import numpy as np
import pytest

from jtl import checkpoint, train
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


def test_reinitialised_head_comes_from_the_fresh_init(pretrained):
  workdir, source = pretrained
  fresh_params = jax.tree.map(np.asarray, source.params)
  fresh_params["head"]["kernel"] = np.full_like(fresh_params["head"]["kernel"], 7.0)
  init_from = ml_collections.ConfigDict(dict(workdir=workdir, step=None, dont_load=("params/head/.*",)))
  params, model_state, report = checkpoint.transfer_init(fresh_params, source.model_state, init_from)
  assert np.all(params["head"]["kernel"] == 7.0)
  np.testing.assert_array_equal(params["backbone"]["stage1"]["conv"]["kernel"],
                                source.params["backbone"]["stage1"]["conv"]["kernel"])
  assert "re-initialised 2" in report


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
