"""Fine-tuning toolkit: layer-wise LR decay, phase schedules (LP-FT), init from a weights file."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jtl import checkpoint, data, layer_decay, masks, models, phases, pretrained, train
from jtl.errors import ConfigError
from jtl.sharding import to_global
from tests.helpers import digits_config, preempt_at

LINEAR_PROBE = (("params/head/.*", True), (".*", False))


def abstract_params(name, **options):
  model = models.build(ml_collections.ConfigDict(dict(name=name, num_classes=10, **options)))
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def scale_of(params, decay):
  mults = layer_decay.multipliers(params, decay)
  return dict(zip(masks.leaf_paths(params), jax.tree.leaves(mults)))


def test_layer_decay_resnet18():
  scales = scale_of(abstract_params("resnet18"), 0.5)
  # 8 basic blocks: head 1, last block 0.5, ..., first block 0.5^8, stem 0.5^9.
  assert scales["params/head/kernel"] == 1.0
  assert scales["params/backbone/stage4_block1/conv2/kernel"] == 0.5
  assert scales["params/backbone/stage4_block0/downsample_conv/kernel"] == 0.5 ** 2
  assert scales["params/backbone/stage1_block0/bn1/scale"] == 0.5 ** 8
  assert scales["params/backbone/stem_conv/kernel"] == 0.5 ** 9


def test_layer_decay_vit_and_small_models():
  scales = scale_of(abstract_params("vit", patch_size=8, width=16, depth=3, num_heads=2,
                                    mlp_dim=32), 0.75)
  assert scales["params/head/bias"] == scales["params/backbone/norm/scale"] == 1.0
  assert scales["params/backbone/block2/mlp/fc1/kernel"] == 0.75
  assert scales["params/backbone/block0/attn/query/kernel"] == 0.75 ** 3
  assert scales["params/backbone/cls_token"] == scales["params/backbone/patch_embed/kernel"] == \
      0.75 ** 4
  scales = scale_of(abstract_params("cnn_small", widths=(4, 8, 16)), 0.5)
  assert [scales[f"params/backbone/stage{i}/conv/kernel"] for i in (1, 2, 3)] == [0.125, 0.25, 0.5]
  scales = scale_of(abstract_params("mlp", hidden=(8, 8), use_bn=True), 0.5)
  assert (scales["params/backbone/dense0/kernel"], scales["params/backbone/bn1/scale"],
          scales["params/head/kernel"]) == (0.25, 0.5, 1.0)


def test_layer_decay_composes_with_lr_mults():
  from jtl import optim
  params = {"backbone": {"stage1": {"conv": {"kernel": jnp.ones(2)}}},
            "head": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
  cfg = optim.default_optim_config()
  cfg.update(dict(name="sgd", lr=1.0, schedule="constant", weight_decay=0.0, layer_decay=0.5,
                  lr_mults=(("params/head/.*", 3.0),)))
  mask = masks.trainable_mask(params, ".*")
  tx, _ = optim.build_optimizer(cfg, params, mask, 10)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["kernel"], -3.0)
  np.testing.assert_allclose(updates["backbone"]["stage1"]["conv"]["kernel"], -0.5)


LPFT = ((0, LINEAR_PROBE), (6, ((".*", True),)))


def lpft_config(**overrides):
  return digits_config(total_steps=12, checkpoint_every=100, phases=LPFT, **overrides)


def test_lpft_backbone_frozen_in_phase_one_then_trained(tmp_path, monkeypatch):
  config = lpft_config()
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  fresh, _ = jax.device_get(train.fresh_variables(train.setup(config, next(batches))))
  preempt_at(monkeypatch, 6)
  train.train(config, str(tmp_path))  # stopped at the end of phase 1
  _, at_six = checkpoint.load_variables(tmp_path, 6)
  monkeypatch.undo()
  final = jax.device_get(train.train(config, str(tmp_path)).params)  # resumed into phase 2
  for init, six, end in zip(jax.tree.leaves(fresh["backbone"]),
                            jax.tree.leaves(at_six["params"]["backbone"]),
                            jax.tree.leaves(final["backbone"])):
    np.testing.assert_array_equal(init, six)  # bit-identical through the linear-probe phase
    assert not np.array_equal(six, end)  # and trained in the fine-tuning phase
  assert not np.array_equal(fresh["head"]["kernel"], at_six["params"]["head"]["kernel"])


def test_lpft_phase_one_compiles_a_linear_probe_and_state_carries_over():
  config = lpft_config()
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  first = next(batches)
  schedule = phases.schedule(config)
  s1, s2 = train.setup(config, first, schedule[0]), train.setup(config, first, schedule[1])
  probe = train.setup(digits_config(trainable=LINEAR_PROBE), first)

  def flops(s):
    return train.make_train_step(s).lower(s.abstract_state, s.abstract_batch).compile(
    ).cost_analysis()["flops"]
  assert flops(s1) == flops(probe) < 0.5 * flops(s2)
  state = train.initial_state(s1, *train.fresh_variables(s1))
  step = train.make_train_step(s1)
  for batch in itertools.islice(batches, 3):
    state, _ = step(state, to_global(batch, s1.batch_sharding))
  before = dict(zip(masks.leaf_paths(state.opt_state, ""), jax.device_get(
      jax.tree.leaves(state.opt_state))))
  after_state = train.switch_phase(s1, s2, state)
  after = dict(zip(masks.leaf_paths(after_state.opt_state, ""),
                   jax.device_get(jax.tree.leaves(after_state.opt_state))))
  head = [p for p in before if "/head/" in p or p.endswith("count")]
  assert head and all(np.array_equal(before[p], after[p]) for p in head)  # carried over
  joined = [p for p in after if p not in before]
  assert any("/backbone/" in p for p in joined)
  assert all(not np.any(after[p]) for p in joined)  # fresh: zero moments and count


def test_lpft_killed_mid_phase_two_resumes_bit_identical(tmp_path, monkeypatch):
  config = lpft_config()
  straight = jax.device_get(train.train(config, str(tmp_path / "straight")))
  preempt_at(monkeypatch, 9)
  train.train(config, str(tmp_path / "resumed"))
  assert checkpoint.completed_steps(tmp_path / "resumed") == [9]
  monkeypatch.undo()
  resumed = jax.device_get(train.train(config, str(tmp_path / "resumed")))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_bad_phases_are_config_errors():
  for bad in (((5, LINEAR_PROBE),), ((0, LINEAR_PROBE), (0, LINEAR_PROBE)),
              ((0, LINEAR_PROBE), (50, LINEAR_PROBE))):
    with pytest.raises(ConfigError, match="phase"):
      phases.schedule(digits_config(phases=bad))
  config = digits_config(phases=((0, LINEAR_PROBE), (5, (("params/nope/.*", True), (".*", False)))))
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  with pytest.raises(ConfigError, match="params/nope"):
    train.setup(config, next(batches))


def test_init_from_a_weights_file(tmp_path):
  source = jax.device_get(train.train(digits_config(total_steps=4), str(tmp_path / "src")))
  path = tmp_path / "weights.npz"
  pretrained.save_npz({"params": source.params, "model_state": source.model_state}, path)
  config = digits_config("linear_probe", total_steps=4, init_from__path=str(path),
                         init_from__workdir=None)
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  s = train.setup(config, next(batches))
  params, model_state = jax.device_get(train.init_variables(s, train.load_transfer_source(s)))
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(source.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(model_state), jax.tree.leaves(source.model_state)):
    np.testing.assert_array_equal(a, b)
  config.init_from.workdir = str(tmp_path / "src")
  with pytest.raises(ConfigError, match="both a workdir and a path"):
    train.load_transfer_source(train.setup(config, next(batches)))
