"""Tests for jtl.models: shapes, param trees and counts, frozen BatchNorm, config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jtl import models
from jtl.errors import ConfigError
from jtl.models.layers import BatchNorm, gelu


def _build(name, **kwargs):
  return models.build(ml_collections.ConfigDict(dict(name=name, **kwargs)))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, shape):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros(shape))


# Small models run for real on 8x8x1 digits-sized inputs.
SMALL = {
    'mlp': {},
    'cnn_small': {},
    'resnet_small': {},
    'vit': dict(patch_size=2, width=32, depth=2, num_heads=2, mlp_dim=64),
}
# Big models are only traced (eval_shape): no allocation, no compile.
BIG = {
    'resnet18': {}, 'resnet34': {}, 'resnet50': {}, 'resnet101': {},
    'vit_tiny': dict(patch_size=4), 'vit_small': dict(patch_size=4), 'vit_base': dict(patch_size=4),
}


def test_every_registered_model_is_tested():
  assert set(models.available()) == set(SMALL) | set(BIG)


@pytest.mark.parametrize('name', sorted(SMALL))
def test_small_models_run(name):
  model = _build(name, num_classes=10, **SMALL[name])
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  # Jitted: one compile per function is faster than op-by-op dispatch.
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert set(variables['params']) == {'backbone', 'head'}

  @jax.jit
  def run(variables, x):
    logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits, model.apply(variables, x, method='features'), model.apply(variables, x)

  logits, features, eval_logits = run(variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert features.ndim == 2 and features.shape[0] == 4
  # Zero-initialised head: logits start at exactly zero.
  np.testing.assert_array_equal(eval_logits, np.zeros((4, 10)))


@pytest.mark.parametrize('name', sorted(BIG))
def test_big_model_shapes(name):
  model = _build(name, num_classes=10, **BIG[name])
  variables = _abstract_init(model, (2, 32, 32, 3))
  assert set(variables['params']) == {'backbone', 'head'}
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 10)


@pytest.mark.parametrize('name, expected', [
    ('resnet18', 11_689_512), ('resnet50', 25_557_032), ('vit_base', 86_567_656)])
def test_param_counts_match_reference(name, expected):
  variables = _abstract_init(_build(name, num_classes=1000), (1, 224, 224, 3))
  assert _count(variables['params']) == expected


def test_resnet_module_names_follow_torchvision():
  params = _abstract_init(_build('resnet50', num_classes=10), (1, 32, 32, 3))['params']['backbone']
  assert {'stem_conv', 'stem_bn', 'stage1_block0', 'stage4_block2'} <= set(params)
  assert set(params['stage2_block0']) == {
      'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv', 'downsample_bn'}
  assert params['stage2_block0']['conv2']['kernel'].shape == (3, 3, 128, 128)


def test_no_head_returns_features():
  model = _build('cnn_small', num_classes=0, widths=(8, 16))
  variables = _abstract_init(model, (2, 8, 8, 1))
  assert set(variables['params']) == {'backbone'}
  assert jax.eval_shape(model.apply, variables, jnp.ones((2, 8, 8, 1))).shape == (2, 16)


def test_bfloat16_compute_float32_params():
  model = _build('cnn_small', num_classes=3, widths=(8,), dtype='bfloat16')
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  # The compute really runs in bf16: the backbone's output and the compiled convolution are bf16
  # (only the logits are cast back to f32 for the losses).
  logits, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  assert logits.dtype == jnp.float32
  assert state['intermediates']['backbone']['__call__'][0].dtype == jnp.bfloat16
  hlo = jax.jit(model.apply).lower(variables, x).as_text()
  convolutions = [line for line in hlo.splitlines() if 'convolution' in line]
  assert convolutions and all('bf16' in line for line in convolutions), convolutions


class _TwoNorms(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    return BatchNorm(name='a')(x, train), BatchNorm(name='b')(x, train)


def test_frozen_norm_uses_and_keeps_running_stats():
  model = _TwoNorms()
  x = jax.random.normal(jax.random.key(0), (16, 4)) * 3 + 1
  variables = model.init(jax.random.key(1), x, train=False)
  # Non-trivial running statistics, so "used the running stats" is distinguishable.
  stats = {'mean': jnp.array([0.5, -1.0, 2.0, 0.0]), 'var': jnp.array([2.0, 0.5, 1.0, 4.0])}
  variables = {**variables, 'batch_stats': {'a': stats, 'b': stats}}
  with models.frozen_norms({'a'}):
    (out_a, out_b), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  for key in ('mean', 'var'):
    np.testing.assert_array_equal(updates['batch_stats']['a'][key], stats[key])
    assert not np.allclose(updates['batch_stats']['b'][key], stats[key])
  expected = (x - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5)
  np.testing.assert_allclose(out_a, expected, rtol=1e-5, atol=1e-5)
  out_eval_a, _ = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(out_a, out_eval_a)
  np.testing.assert_allclose(out_b.mean(0), 0.0, atol=1e-5)  # b normalises with batch statistics
  assert models.current_frozen_norms() == frozenset()  # context restored


def test_frozen_norms_in_a_model_under_jit():
  model = _build('cnn_small', num_classes=5, widths=(8, 16))
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  frozen = {'backbone/stage1/bn'}

  @jax.jit
  def train_apply(variables, x):
    with models.frozen_norms(frozen):  # entered at trace time, inside the jitted function
      return model.apply(variables, x, train=True, mutable=['batch_stats'])

  _, updates = train_apply(variables, x)
  old, new = variables['batch_stats']['backbone'], updates['batch_stats']['backbone']
  jax.tree.map(np.testing.assert_array_equal, new['stage1'], old['stage1'])
  assert not np.allclose(new['stage2']['bn']['var'], old['stage2']['bn']['var'])
  # All norms frozen: training-mode features equal evaluation-mode features.
  with models.frozen_norms({'backbone/stage1/bn', 'backbone/stage2/bn'}):
    train_features = model.apply(variables, x, train=True, method='features')
  np.testing.assert_array_equal(train_features, model.apply(variables, x, method='features'))


def test_gelu_is_exact_gelu():
  """erf form == flax's erfc form (and the closed-form derivative Phi(x) + x phi(x)) to 1e-6
  absolute: for x < -5 the erf form (like PyTorch's) rounds values below 5e-7 to 0."""
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jnp.array([0.0, -0.5, 1e-4, -1e-4])])
  np.testing.assert_allclose(gelu(x), nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  phi = jnp.exp(-x * x / 2) / jnp.sqrt(2 * jnp.pi)
  cdf = 0.5 * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0)))
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), cdf + x * phi, rtol=1e-5, atol=1e-6)
  assert float(gelu(jnp.float32(1.0))) == pytest.approx(0.8413447 * 1.0, abs=1e-6)  # Phi(1)
  assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_unknown_model_name():
  with pytest.raises(ConfigError, match=r"unknown model 'resnet19' \(did you mean 'resnet18'\?\); "
                                        r"choose one of: .*resnet18"):
    _build('resnet19', num_classes=10)


def test_unknown_and_missing_options():
  with pytest.raises(ConfigError, match=r"no option\(s\) widht \(did you mean 'width'\?\); "
                                        r"valid options: .*width"):
    _build('resnet_small', num_classes=10, widht=8)
  with pytest.raises(ConfigError, match='needs num_classes'):
    _build('mlp')
  with pytest.raises(ConfigError, match='unknown model dtype'):
    _build('mlp', num_classes=2, dtype='float8')
  with pytest.raises(ConfigError, match='unknown pool'):
    _build('vit_tiny', num_classes=2, pool='max')
  with pytest.raises(ConfigError, match='head_init'):
    _build('mlp', num_classes=2, head_init='ones')


def test_patch_size_must_divide_image():
  model = _build('vit', num_classes=2, patch_size=3, width=8, depth=1, num_heads=1, mlp_dim=8)
  with pytest.raises(ConfigError, match='not divisible by patch_size 3'):
    _abstract_init(model, (1, 8, 8, 1))


def test_build_overrides_and_lists():
  config = ml_collections.ConfigDict(dict(name='mlp', num_classes=10, hidden=[16, 8]))
  model = models.build(config, num_classes=0)
  assert model.num_classes == 0 and model.backbone.hidden == (16, 8)
