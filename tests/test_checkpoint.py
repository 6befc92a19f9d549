"""Transfer init: backbone loaded, head re-initialised, mismatches reported as one-line errors."""
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import transfer_digits
from jtl import checkpoint, data, evaluate, train
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


def _head_of(params, outputs):
  """`params` with a fresh `outputs`-way head (zeros)."""
  head = {k: np.zeros(v.shape[:-1] + (outputs,), v.dtype) for k, v in params["head"].items()}
  return {**params, "head": head}


def test_remap_loads_a_head_from_chosen_rows_of_the_source_head(pretrained):
  """`init_from.remap` (target regex, source template, indices): a 2-way head starts from the source
  head's units 3 and 1, kernel and bias alike; it wins over `dont_load`; the backbone loads as usual."""
  workdir, source = pretrained
  init_from = ml_collections.ConfigDict(dict(
      workdir=workdir, step=None, dont_load=("params/head/.*",),
      remap=(("params/head/(kernel|bias)", r"params/head/\1", (3, 1)),)))
  params, model_state, report = checkpoint.transfer_init(_head_of(source.params, 2),
                                                         source.model_state, init_from)
  np.testing.assert_array_equal(params["head"]["kernel"], source.params["head"]["kernel"][:, [3, 1]])
  np.testing.assert_array_equal(params["head"]["bias"], source.params["head"]["bias"][[3, 1]])
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(source.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  assert "re-initialised 0" in report and "unexpected (ignored) 0" in report


@pytest.mark.parametrize("remap, message", [
    ((("params/head/(kernel|bias)", r"params/heads/printed/\1", (0, 1)),),
     r"params/heads/printed/kernel \(not in the source\)"),
    ((("params/head/(kernel|bias)", r"params/head/\1", (0, 99)),), "indices outside its last axis"),
    ((("params/tail/.*", "params/head/kernel"),), "remap pattern 'params/tail/.\\*' matches no parameter"),
    ((("params/head/(kernel|bias)",),), "is not \\(target regex, source path\\[, indices\\]\\)"),
])
def test_bad_remap_is_a_one_line_error(pretrained, remap, message):
  workdir, source = pretrained
  init_from = ml_collections.ConfigDict(dict(workdir=workdir, step=None, dont_load=("params/head/.*",),
                                             remap=remap))
  with pytest.raises(ConfigError, match=message) as e:
    checkpoint.transfer_init(_head_of(source.params, 2), source.model_state, init_from)
  assert "\n" not in str(e.value) and "remap" in str(e.value)


def test_step_0_checkpoint_holds_the_transferred_init_and_frozen_batchnorm_stays_put(pretrained,
                                                                                    tmp_path):
  """`checkpoint_initial` (transfer_digits sets it): step 0 is saved and evaluated, and holds the
  transferred backbone. With the BatchNorm parameters frozen (transfer_digits' bn=frozen), training
  leaves them and their running statistics bit-identical while the convolutions move."""
  workdir, source = pretrained
  config = digits_config("finetune", total_steps=4, checkpoint_every=2, init_from__workdir=workdir)
  config.trainable = transfer_digits.get_config("mode=finetune,bn=frozen").trainable
  assert config.checkpoint_initial
  state = jax.device_get(train.train(config, str(tmp_path)))
  assert checkpoint.completed_steps(tmp_path) == [0, 2, 4]
  _, start = checkpoint.load_variables(tmp_path, 0)
  for a, b in zip(jax.tree.leaves(start["params"]["backbone"]),
                  jax.tree.leaves(source.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  assert [r["step"] for r in evaluate.evaluate_checkpoints(None, tmp_path)] == [0, 2, 4]
  for stage in source.params["backbone"]:
    for a, b in zip(jax.tree.leaves(state.params["backbone"][stage]["bn"]),
                    jax.tree.leaves(source.params["backbone"][stage]["bn"])):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(state.params["backbone"][stage]["conv"]["kernel"],
                              source.params["backbone"][stage]["conv"]["kernel"])
  for a, b in zip(jax.tree.leaves(state.model_state), jax.tree.leaves(source.model_state)):
    np.testing.assert_array_equal(a, b)


def test_transfer_digits_head_and_bn_arguments():
  config = transfer_digits.get_config("mode=finetune,head=printed,bn=frozen,pretrain=/p")
  assert tuple(config.init_from.remap) == (
      ("params/head/(kernel|bias)", r"params/heads/printed/\1", transfer_digits.TARGET_CLASSES),)
  assert tuple(config.trainable) == (("params/backbone/.*/bn/.*", False), (".*", True))
  plain = transfer_digits.get_config("mode=finetune,pretrain=/p")
  assert not plain.init_from.remap and tuple(plain.trainable) == ((".*", True),)
  for bad in ("head=source", "bn=eval"):
    with pytest.raises(ValueError, match=bad.split("=")[1]):
      transfer_digits.get_config(f"mode=finetune,{bad}")


def test_a_run_killed_after_its_step_0_checkpoint_resumes_without_saving_it_again(tmp_path):
  """`checkpoint_initial` saves step 0 before the first step; a run killed before its next checkpoint
  (a sweep's cell killed early) resumes from step 0, which it must not save a second time (orbax:
  StepAlreadyExistsError)."""
  config = digits_config(total_steps=4, checkpoint_every=2, checkpoint_initial=True)
  train.train(config, str(tmp_path))
  for step in (2, 4):  # as if killed right after step 0 was saved
    shutil.rmtree(tmp_path / "checkpoints" / str(step))
  assert checkpoint.completed_steps(tmp_path) == [0]
  train.train(config, str(tmp_path))
  assert checkpoint.completed_steps(tmp_path) == [0, 2, 4]
