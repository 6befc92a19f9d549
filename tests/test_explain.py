"""Grad-CAM and CAM (jtl/explain.py) against hand computations, and the explain CLI end to end."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from absl import flags

from jtl import explain, models
from jtl.errors import ConfigError
from jtl.models.layers import BatchNorm
from jtl.models.resnet import ResidualBlock


def _random_variables(model, images, seed, head_scale=1.0):
  """Random weights and non-trivial BatchNorm statistics, drawn with NumPy on the shapes of
  `model.init` (traced, not run: compiling the initialisers would dominate this file's time)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])

  def draw(path, leaf):
    name = path[-1].key
    if name in ("var", "scale"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _captured(model, variables, images):
  """Logits and every module's output, recorded by flax itself (independent of jtl.explain)."""
  return jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                          mutable=["intermediates"]))(variables, images)


def _bilinear_normalised(raw, factor):
  """Reference for `explain`'s output: scipy's half-pixel bilinear zoom, then per-image min-max."""
  up = np.stack([scipy.ndimage.zoom(m, factor, order=1, grid_mode=True, mode="nearest")
                 for m in raw])
  low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
  constant = high == low  # e.g. no positive evidence at all: documented to come out as zeros
  return np.where(constant, 0.0, (up - low) / np.where(constant, 1.0, high - low))


def test_gradcam_equals_hand_split_resnet():
  model = models.build(dict(name="resnet_small", num_classes=3, stage_sizes=(1, 1, 1), width=4,
                            head_init="lecun_normal"))
  images = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
  variables = _random_variables(model, images, seed=0)
  p, s = variables["params"]["backbone"], variables["batch_stats"]["backbone"]

  def block(name, features, strides, x):
    return ResidualBlock(features=features, strides=strides).apply(
        {"params": p[name], "batch_stats": s[name]}, x, False)

  def up_to_layer(x):  # stem, stage1, stage2_block0: A is a 4x4 map
    x = nn.Conv(4, (3, 3), padding=1, use_bias=False).apply({"params": p["stem_conv"]}, x)
    x = nn.relu(BatchNorm().apply({"params": p["stem_bn"], "batch_stats": s["stem_bn"]}, x, False))
    return block("stage2_block0", 8, 2, block("stage1_block0", 4, 1, x))

  def logits_of(a):  # the rest as a function of A
    head = variables["params"]["head"]
    return jnp.mean(block("stage3_block0", 16, 2, a), axis=(1, 2)) @ head["kernel"] + head["bias"]

  @jax.jit
  def reference(x, classes):  # class -1: the predicted one
    a = up_to_layer(x)
    logits = logits_of(a)
    chosen = jnp.where(classes < 0, jnp.argmax(logits, -1), classes)
    grads = jax.grad(lambda a: logits_of(a)[jnp.arange(3), chosen].sum())(a)
    return a, logits, grads

  for classes in (None, np.array([2, 0, 1])):
    wanted = np.full(3, -1) if classes is None else classes
    activations, expected_logits, grads = reference(images, wanted)
    alpha = grads.mean(axis=(1, 2))
    expected = np.maximum(np.einsum("bhwk,bk->bhw", activations, alpha), 0.0)
    assert expected.max() > 0

    raw, logits = explain.feature_maps(model, variables, images, layer="backbone/stage2_block0",
                                       classes=classes)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-7 * expected.max())
    maps, predicted, _ = explain.explain(model, variables, images, layer="backbone/stage2_block0",
                                         classes=classes)
    np.testing.assert_array_equal(predicted, np.argmax(expected_logits, -1))
    np.testing.assert_allclose(maps, _bilinear_normalised(expected, 2), atol=1e-4)


def _quadrant_detector():
  """cnn_small (widths 2, 2) by hand: channel 0 = relu(x - 0.5) (bright), channel 1 = relu(0.45 - x)
  (dark), both kept by stage2; class 0 = bright minus dark, class 1 = dark minus bright."""
  model = models.build(dict(name="cnn_small", num_classes=2, widths=(2, 2)))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  eps = BatchNorm.epsilon  # var = 1 - eps: BatchNorm divides by exactly 1
  k1 = np.zeros((3, 3, 1, 2), np.float32)
  k1[1, 1, 0] = [1.0, -1.0]
  k2 = np.zeros((3, 3, 2, 2), np.float32)
  k2[1, 1] = np.eye(2)
  params = {
      "backbone": {
          "stage1": {"conv": {"kernel": k1}, "bn": {"scale": np.ones(2), "bias": np.zeros(2)}},
          "stage2": {"conv": {"kernel": k2}, "bn": {"scale": np.ones(2), "bias": np.zeros(2)}}},
      "head": {"kernel": np.array([[1.0, -1.0], [-1.0, 1.0]]), "bias": np.zeros(2)}}
  stats = {"backbone": {
      "stage1": {"bn": {"mean": np.array([0.5, -0.45]), "var": np.full(2, 1 - eps)}},
      "stage2": {"bn": {"mean": np.zeros(2), "var": np.full(2, 1 - eps)}}}}
  cast = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
  assert jax.tree.structure(cast(params)) == jax.tree.structure(variables["params"])
  return model, {"params": cast(params), "model_state": {"batch_stats": cast(stats)}}


def test_gradcam_peaks_where_the_class_evidence_is():
  model, variables = _quadrant_detector()
  rng = np.random.default_rng(0)
  images = rng.uniform(0.0, 0.4, (2, 16, 16, 1)).astype(np.float32)
  squares = [(slice(2, 6), slice(10, 14)), (slice(12, 16), slice(4, 8))]  # top right, bottom left
  for image, (rows, cols) in zip(images, squares):
    image[rows, cols] = 1.0
  bright, _, _ = explain.explain(model, variables, images, classes=0)
  dark, _, _ = explain.explain(model, variables, images, classes=1)
  for b, (rows, cols) in enumerate(squares):
    i, j = np.unravel_index(np.argmax(bright[b]), (16, 16))
    assert rows.start <= i < rows.stop and cols.start <= j < cols.stop, (b, i, j)
    assert np.all(np.asarray(bright[b])[rows, cols] > 0.5)
    i, j = np.unravel_index(np.argmax(dark[b]), (16, 16))
    assert not (rows.start <= i < rows.stop and cols.start <= j < cols.stop), (b, i, j)
    assert np.asarray(dark[b])[rows, cols].max() < 0.5


def test_cam_is_positive_multiple_of_gradcam_for_gap_linear():
  model = models.build(dict(name="cnn_small", num_classes=4, widths=(4, 6)))
  images = np.random.default_rng(3).normal(size=(3, 8, 8, 1)).astype(np.float32)
  variables = _random_variables(model, images, seed=2)
  assert explain.default_layer(model) == "backbone/stage2"
  cam, cam_logits = explain.feature_maps(model, variables, images, method="cam")
  gradcam, logits = explain.feature_maps(model, variables, images)
  assert cam.shape == gradcam.shape == (3, 4, 4)
  # Selvaraju et al. sec. 3.1: alpha_k^c = w_k^c / (hw), so Grad-CAM = ReLU(CAM) / (hw).
  np.testing.assert_allclose(gradcam, np.maximum(cam, 0.0) / 16, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(cam_logits, logits, rtol=1e-6)
  # CAM itself: the head kernel's column of the top class on the (independently captured) features.
  _, state = _captured(model, variables, images)
  features = np.asarray(state["intermediates"]["backbone"]["stage2"]["__call__"][0])
  top = np.argmax(logits, -1)
  expected = np.einsum("bhwk,kb->bhw", features, variables["params"]["head"]["kernel"][:, top])
  np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)


def _vit(pool):
  model = models.build(dict(name="vit", num_classes=3, patch_size=4, width=8, depth=1, num_heads=2,
                            mlp_dim=16, pool=pool, head_init="lecun_normal"))
  images = np.random.default_rng(5).normal(size=(2, 8, 12, 3)).astype(np.float32)  # 2 x 3 patches
  return model, _random_variables(model, images, seed=4), images


def test_vit_token_maps_on_the_patch_grid():
  model, variables, images = _vit("cls")
  assert explain.default_layer(model) == "backbone/block0/norm1"  # [B, 1 + 6, D]
  raw, _ = explain.feature_maps(model, variables, images)
  assert raw.shape == (2, 2, 3) and np.all(np.asarray(raw) >= 0) and np.asarray(raw).max() > 0
  maps, _, _ = explain.explain(model, variables, images)
  assert maps.shape == (2, 8, 12) and float(maps.min()) == 0.0 and float(maps.max()) == 1.0

  # pool='gap': CAM on the final tokens, against tokens captured by flax and laid out by hand.
  model, variables, images = _vit("gap")
  cam, logits = explain.feature_maps(model, variables, images, method="cam")
  _, state = _captured(model, variables, images)
  tokens = np.asarray(state["intermediates"]["backbone"]["norm"]["__call__"][0])  # [2, 6, 8]
  grid = np.zeros((2, 2, 3, 8), np.float32)
  for r in range(2):
    for c in range(3):
      grid[:, r, c] = tokens[:, 3 * r + c]  # row-major, as the patch embedding flattened them
  kernel = variables["params"]["head"]["kernel"][:, np.argmax(logits, -1)]
  np.testing.assert_allclose(cam, np.einsum("bhwk,kb->bhw", grid, kernel), rtol=1e-5, atol=1e-6)
  gradcam, _ = explain.feature_maps(model, variables, images)
  np.testing.assert_allclose(gradcam, np.maximum(cam, 0.0) / 6, rtol=1e-4, atol=1e-7)


def test_bad_inputs_are_config_errors():
  model = models.build(dict(name="resnet_small", num_classes=3, stage_sizes=(1, 1), width=4))
  images = np.zeros((2, 8, 8, 1), np.float32)
  variables = _random_variables(model, images, seed=0)
  with pytest.raises(ConfigError, match="unknown layer 'backbone/stage2_blok0'; nearest module "
                     "paths: backbone/stage2_block0,"):
    explain.explain(model, variables, images, layer="backbone/stage2_blok0")
  with pytest.raises(ConfigError, match="not a feature map"):
    explain.explain(model, variables, images, layer="backbone")
  with pytest.raises(ConfigError, match="CAM is defined at the pooled feature map"):
    explain.explain(model, variables, images, method="cam", layer="backbone/stage1_block0")
  with pytest.raises(ConfigError, match="classes must be"):
    explain.explain(model, variables, images, classes=[0, 3])
  with pytest.raises(ConfigError, match="unknown method"):
    explain.explain(model, variables, images, method="gradcam++")
  vit, vit_variables, vit_images = _vit("cls")
  with pytest.raises(ConfigError, match="CAM needs global average pooling"):
    explain.explain(vit, vit_variables, vit_images, method="cam")
  mlp = models.build(dict(name="mlp", num_classes=3, hidden=(4,)))
  with pytest.raises(ConfigError, match="no default layer"):
    explain.explain(mlp, _random_variables(mlp, images, seed=0), images)


def test_cli_writes_the_grid(tmp_path, capsys):
  from experiments import explain as explain_cli
  from jtl import train
  from tests.helpers import digits_config

  workdir = tmp_path / "run"
  train.train(digits_config(total_steps=4, log_every=2, mesh__axes=(("data", 1),)), str(workdir))

  def run(*args):
    argv = ["explain", f"--workdir={workdir}", *args]
    flag_values = flags.FlagValues()
    explain_cli.define_flags(flag_values, argv)
    flag_values(argv)
    explain_cli.main(flag_values)

  with pytest.raises(ConfigError, match="unknown layer"):
    run("--layer=backbone/stage9")
  assert not (workdir / "plots").exists()
  run("--num=5")
  path = workdir / "plots" / "gradcam_step4.png"
  assert capsys.readouterr().out.splitlines()[-1] == str(path)  # (TFDS may print before)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
