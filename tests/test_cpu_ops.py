"""jtl.models.cpu_ops: the matmul convolution and slices max-pool equal XLA's ops (values and
gradients), are routed only where documented, and leave a whole model's outputs unchanged. Which
route a model takes is its own `fast_paths` field (model option `cpu_fast_paths`), never a global:
two models with different settings coexist, and the accumulation loop traces a loop-body copy."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from jtl import accumulate, masks, objectives
from jtl.errors import ConfigError
from jtl.models import cpu_ops, registry, resnet

NHWC = ("NHWC", "HWIO", "NHWC")
ON = cpu_ops.FastPaths()  # a model's default
OFF = cpu_ops.FastPaths(enabled=False)
LOOP = cpu_ops.FastPaths(every_conv=True)  # a loop body's copy


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _values_and_grads(f, *args, seed=99):
  out, vjp = jax.vjp(f, *args)
  return (out,) + vjp(_random(out.shape, seed))


# (input NHWC, kernel hw, strides, padding): 1x1 and 2x2 maps where most taps read padding, a tap
# that reads only padding, strides, asymmetric and string paddings, non-square everything.
CONV_CASES = [
    ((2, 1, 1, 5), (3, 3), (1, 1), [(1, 1), (1, 1)]),
    ((2, 2, 2, 5), (3, 3), (1, 1), "SAME"),
    ((2, 2, 2, 5), (3, 3), (2, 2), [(1, 1), (1, 1)]),
    ((3, 4, 4, 6), (3, 3), (2, 2), [(1, 1), (1, 1)]),
    ((2, 3, 5, 4), (3, 1), (1, 2), "SAME"),
    ((2, 4, 4, 3), (4, 4), (4, 4), "VALID"),
    ((2, 2, 2, 5), (5, 5), (1, 1), [(2, 2), (2, 2)]),
    ((2, 3, 3, 2), (3, 3), (1, 1), [(0, 2), (1, 0)]),
    ((2, 1, 3, 4), (3, 3), (1, 1), [(3, 3), (1, 1)]),
    ((2, 8, 8, 3), (1, 1), (2, 2), "VALID"),
]


@pytest.mark.parametrize("shape,k_hw,strides,padding", CONV_CASES)
def test_conv_as_matmul_equals_xla_conv(shape, k_hw, strides, padding):
  x, kernel = _random(shape, 0), _random(k_hw + (shape[-1], 7), 1)
  ref = _values_and_grads(
      lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC), x, kernel)
  got = _values_and_grads(lambda x, k: cpu_ops.conv_as_matmul(x, k, strides, padding), x, kernel)
  for r, g in zip(ref, got):
    assert r.shape == g.shape
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)


def _primitives(f, *args):
  return {eqn.primitive.name for eqn in jax.make_jaxpr(f)(*args).eqns}


def _all_primitives(f, *args):
  """Primitive names of `f`'s jaxpr and of every sub-jaxpr (scan, cond, pjit and remat bodies)."""
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)
  walk(jax.make_jaxpr(f)(*args).jaxpr)
  return names


def test_only_small_maps_become_matmuls():
  kernel = _random((3, 3, 4, 8), 0)

  def conv(x, fast_paths=ON):
    return fast_paths.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)],
                                           dimension_numbers=NHWC)
  small, large = _random((2, 4, 4, 4), 1), _random((2, 5, 5, 4), 2)  # 16 and 25 output pixels
  assert "conv_general_dilated" not in _primitives(conv, small)
  assert "conv_general_dilated" in _primitives(conv, large)
  grouped = lambda x: ON.conv_general_dilated(  # noqa: E731
      x, _random((3, 3, 2, 8), 3), (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
  dilated = lambda x: ON.conv_general_dilated(  # noqa: E731
      x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC)
  assert "conv_general_dilated" in _primitives(grouped, small)
  assert "conv_general_dilated" in _primitives(dilated, small)
  # A loop body's setting: every map size is a matmul.
  assert "conv_general_dilated" not in _primitives(lambda x: conv(x, LOOP), large)
  assert "conv_general_dilated" in _primitives(lambda x: conv(x, OFF), small)  # off: XLA's
  assert "conv_general_dilated" in _primitives(  # a disabled setting stays off in a loop body
      lambda x: conv(x, cpu_ops.in_loop_body(OFF)), large)


def test_pad_channels_leaves_the_convolution_unchanged():
  x, kernel = _random((2, 6, 6, 3), 0), _random((3, 3, 3, 5), 1)
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
  padded_x, padded_k = cpu_ops.pad_channels(x, kernel)
  assert padded_x.shape == (2, 6, 6, 4) and padded_k.shape == (3, 3, 4, 5)
  ref = _values_and_grads(conv, x, kernel)
  got = _values_and_grads(lambda x, k: conv(*cpu_ops.pad_channels(x, k)), x, kernel)
  for r, g in zip(ref, got):
    assert r.shape == g.shape
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)


def _conv_input_channels(f, *args):
  return [eqn.invars[0].aval.shape[-1] for eqn in jax.make_jaxpr(f)(*args).eqns
          if eqn.primitive.name == "conv_general_dilated"]


def test_channel_padding_follows_the_measurement_once_per_shape(monkeypatch):
  measured = []

  def fake_ratio(key):
    measured.append(key)
    return ratio

  monkeypatch.setattr(cpu_ops, "_time_candidates", fake_ratio)
  monkeypatch.setattr(cpu_ops, "_PAD_CHOICES", {})
  x, kernel = _random((2, 6, 6, 3), 0), _random((3, 3, 3, 5), 1)

  def conv(x, fast_paths=ON):
    return fast_paths.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
  ratio = cpu_ops.PAD_GAIN  # padding pays: the conv reads 4 channels
  assert _conv_input_channels(conv, x) == [4]
  ratio = 1.0  # a new shape that does not gain: 3 channels stay
  assert _conv_input_channels(conv, x[:1]) == [3]
  assert _conv_input_channels(conv, x) == [4]  # the first answer is kept, not measured again
  assert len(measured) == 2
  np.testing.assert_allclose(
      jax.jit(conv)(x), lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC),
      atol=2e-5, rtol=1e-5)
  four = _random((3, 3, 4, 5), 3)  # a multiple of 4 channels is never measured
  assert _conv_input_channels(lambda x: ON.conv_general_dilated(
      x, four, (1, 1), "SAME", dimension_numbers=NHWC), _random((2, 6, 6, 4), 4)) == [4]
  assert _conv_input_channels(lambda x: conv(x, OFF), x) == [3]
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # multi-host: never measured, never padded
  assert _conv_input_channels(lambda x: conv(x), x) == [3]  # noqa: PLW0108
  assert len(measured) == 2


def test_channel_padding_is_measured_while_a_jit_traces(monkeypatch):
  """The timing runs eagerly inside the outer trace (not staged into it) and records a choice."""
  monkeypatch.setattr(cpu_ops, "_PAD_CHOICES", {})
  kernel = _random((3, 3, 3, 8), 1)
  out = jax.jit(lambda x: ON.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=NHWC))(_random((2, 8, 8, 3), 0))
  assert out.shape == (2, 8, 8, 8)
  (choice,) = cpu_ops._PAD_CHOICES.values()
  assert isinstance(choice, bool)
  key = ((2, 8, 8, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1)), "float32", "float32")
  assert list(cpu_ops._PAD_CHOICES) == [repr(key)]
  assert 0.0 < cpu_ops._time_candidates(key) < 100.0


def test_channel_padding_choices_are_shared_through_a_directory(monkeypatch, tmp_path):
  """A second process (here: a cleared table) reads the first one's choices instead of timing."""
  monkeypatch.setattr(cpu_ops, "_PAD_CHOICES", {})
  monkeypatch.setattr(cpu_ops, "_time_candidates", lambda key: 2.0 * cpu_ops.PAD_GAIN)
  monkeypatch.setattr(cpu_ops, "_choices_path", None)
  cpu_ops.remember_choices(str(tmp_path / "cache"))
  kernel = _random((3, 3, 3, 5), 1)

  def conv(x):
    return ON.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
  assert _conv_input_channels(conv, _random((2, 6, 6, 3), 0)) == [4]
  saved = tmp_path / "cache" / cpu_ops.CHOICES_FILE
  assert list(json.loads(saved.read_text()).values()) == [True]

  def must_not_time(key):
    raise AssertionError("measured again")
  monkeypatch.setattr(cpu_ops, "_time_candidates", must_not_time)
  monkeypatch.setattr(cpu_ops, "_PAD_CHOICES", {})
  cpu_ops.remember_choices(str(tmp_path / "cache"))
  assert _conv_input_channels(lambda x: conv(x), _random((2, 6, 6, 3), 0)) == [4]  # noqa: PLW0108
  saved.write_text("not json")  # an unreadable file is ignored (and rewritten by a new choice)
  monkeypatch.setattr(cpu_ops, "_PAD_CHOICES", {})
  monkeypatch.setattr(cpu_ops, "_time_candidates", lambda key: 1.0)
  cpu_ops.remember_choices(str(tmp_path / "cache"))  # (a new function: traces are cached)
  assert _conv_input_channels(lambda x: conv(x), _random((2, 6, 6, 3), 0)) == [3]  # noqa: PLW0108
  assert list(json.loads(saved.read_text()).values()) == [False]
  cpu_ops.remember_choices(None)


def test_a_choice_another_process_wrote_first_wins_over_this_ones_measurement(monkeypatch, tmp_path):
  """Two processes time the same shape at once (a busy machine) and disagree: the one that writes
  second adopts the first one's choice, so a run and its resumption trace the same program."""
  monkeypatch.setattr(cpu_ops, "_PAD_CHOICES", {})
  monkeypatch.setattr(cpu_ops, "_choices_path", None)
  cpu_ops.remember_choices(str(tmp_path / "cache"))
  saved = tmp_path / "cache" / cpu_ops.CHOICES_FILE
  x, kernel = _random((2, 6, 6, 3), 0), _random((3, 3, 3, 5), 1)
  key = repr(((2, 6, 6, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), "float32", "float32"))

  def measured_while_another_process_wrote(k):
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({key: False, "other shape": True}))  # it finished first: no padding
    return 2.0 * cpu_ops.PAD_GAIN  # this process's timing says: pad
  monkeypatch.setattr(cpu_ops, "_time_candidates", measured_while_another_process_wrote)
  assert _conv_input_channels(lambda x: ON.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=NHWC), x) == [3]
  assert json.loads(saved.read_text()) == {key: False, "other shape": True}
  cpu_ops.remember_choices(None)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((2, 7, 5, 3), (2, 2), (2, 2), "VALID"),
    ((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 6, 9, 2), (3, 2), (1, 2), "SAME"),
])
def test_max_pool_as_slices_equals_nn_max_pool(shape, window, strides, padding):
  x = _random(shape, 0)  # continuous values: no ties, where the two gradients may differ
  _assert_same_pool(x, window, strides, padding)
  assert "select_and_scatter_add" not in _primitives(
      jax.grad(lambda x: ON.max_pool(x, window, strides, padding).sum()), x)
  # Ties (a constant map; ReLU zeros): each window's gradient goes to its first maximum, as XLA's.
  _assert_same_pool(jnp.round(x), window, strides, padding)


def _assert_same_pool(x, window, strides, padding):
  ref = _values_and_grads(lambda x: nn.max_pool(x, window, strides=strides, padding=padding), x)
  got = _values_and_grads(lambda x: cpu_ops.max_pool_as_slices(x, window, strides, padding), x)
  np.testing.assert_array_equal(got[0], ref[0])
  # Overlapping windows add several cotangents into one input, in another order: 1-ulp differences.
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-6, atol=1e-6)


def _loss_and_grads(model, x):
  """(loss, batch_stats updates, gradients) of a training step of `model` (traced afresh)."""
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params):
    out, updates = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
    return jnp.sum(out * jnp.arange(out.shape[-1])), updates
  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return (value, updates, grads), lambda: _primitives(jax.grad(lambda p: loss(p)[0]),
                                                      variables["params"])


def _assert_close(fast, reference):
  # Float32 rounding (summation order differs), relative to each array's scale: gradients that
  # cancel to near zero differ more than that relative to themselves.
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
    assert np.max(np.abs(a - b)) <= 2e-5 * np.max(np.abs(b)), np.max(np.abs(a - b))


@pytest.mark.slow
def test_resnet_with_fast_paths_equals_xla_ops():
  # ImageNet stem on 32x32: 8x8 after the stem's pool, then 4x4, 2x2 and 1x1 maps (matmul route).
  x = _random((8, 32, 32, 3), 0)
  fast, fast_primitives = _loss_and_grads(
      resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, stem="imagenet"), x)
  reference, reference_primitives = _loss_and_grads(
      resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, stem="imagenet", fast_paths=OFF), x)
  _assert_close(fast, reference)
  assert "select_and_scatter_add" in reference_primitives()  # XLA's own max-pool gradient (off)
  assert "select_and_scatter_add" not in fast_primitives()  # the slices max-pool (on)


def _model(cpu_fast_paths=None):
  config = dict(name="resnet18", num_classes=4)
  if cpu_fast_paths is not None:
    config["cpu_fast_paths"] = cpu_fast_paths
  return registry.build(config)


def _conv_count(model, x):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  return sum(eqn.primitive.name == "conv_general_dilated" for eqn in jaxpr.jaxpr.eqns)


def test_the_model_option_chooses_the_path_per_model_and_one_model_never_moves_another():
  """`model.cpu_fast_paths` is each model's own: the default (on) and an `off` model built in the
  same process trace different programs in any order, and equal results (above); building,
  tracing or training one does not change what the other traces."""
  x = _random((2, 32, 32, 3), 0)
  on, off = _model(), _model(cpu_fast_paths=False)
  assert on.backbone.fast_paths == ON and off.backbone.fast_paths == OFF
  # resnet18 at 32x32: stem, then 8x8, 4x4, 2x2, 1x1 maps: 20 convolutions, 10 of them small.
  first = (_conv_count(on, x), _conv_count(off, x))
  assert first[1] == 20 and first[0] < first[1], first
  _loss_and_grads(registry.build(dict(  # another model, fast paths off: built and trained
      name="resnet_small", num_classes=4, width=4, stage_sizes=(1,), cpu_fast_paths=False)),
      x[:1, :8, :8])
  on_again = _model()
  assert (_conv_count(on, x), _conv_count(off, x), _conv_count(on_again, x)) == first + first[:1]
  with pytest.raises(ConfigError, match="--config.model.cpu_fast_paths"):
    _model(cpu_fast_paths="yes")


def test_a_loop_body_copy_takes_every_conv_as_a_matmul_with_the_same_parameters():
  model = _model()
  x = _random((2, 32, 32, 3), 1)
  body = cpu_ops.in_loop_body(model)
  assert body.backbone.fast_paths == LOOP and model.backbone.fast_paths == ON  # a copy
  assert _conv_count(body, x) == 0 < _conv_count(model, x)
  assert cpu_ops.in_loop_body(_model(cpu_fast_paths=False)).backbone.fast_paths == OFF
  variables = model.init(jax.random.key(0), x, train=False)
  assert (jax.tree.structure(body.init(jax.random.key(0), x, train=False))
          == jax.tree.structure(variables))
  np.testing.assert_allclose(body.apply(variables, x, train=False),
                             model.apply(variables, x, train=False), rtol=2e-5, atol=2e-5)


def test_gradient_accumulation_traces_the_loop_body_copy_and_evaluation_the_model():
  """XLA:CPU runs convolutions inside a loop many times slower (cpu_ops.FastPaths.every_conv): the
  accumulation scan traces the objective's loop-body copy (no convolution left in it), while the
  objective itself, which evaluation and un-accumulated steps trace, keeps XLA's kernels on large
  maps."""
  from experiments.configs.common import base_config  # noqa: PLC0415
  config = base_config()
  config.model = ml_collections.ConfigDict(dict(name="cnn_small", num_classes=10))
  objective = objectives.build(config)
  batch = {"image": _random((4, 8, 8, 1), 0), "label": jnp.zeros((4,), jnp.int32)}
  params, model_state = objective.init(jax.random.key(0), batch)
  trainable = masks.trainable_mask(params, ((".*", True),))
  trainable_params, frozen_params = masks.partition(params, trainable)

  def step(accum):
    return lambda p: accumulate.gradients(objective, p, frozen_params, model_state, batch,
                                          jax.random.key(1), trainable=trainable, step=0,
                                          accum=accum)
  assert "conv_general_dilated" in _all_primitives(step(1), trainable_params)  # 8x8: XLA's
  accumulated = _all_primitives(step(2), trainable_params)
  assert "scan" in accumulated and "conv_general_dilated" not in accumulated
  assert "conv_general_dilated" in _all_primitives(
      lambda p: objective.eval_metrics(p, model_state, batch), params)
