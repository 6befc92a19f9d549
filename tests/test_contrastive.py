"""SimCLR and SupCon: training, 8 devices == 1, exact resume, transfer init, loss references."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jtl import augment, checkpoint, evaluate, masks, train
from jtl.data import pipeline
from jtl.errors import ConfigError
from jtl.objectives import build as build_objective
from jtl.objectives import contrastive
from tests import test_representation_evaluators as references
from tests.helpers import compile_fast  # noqa: F401  (autouse: this module compiles fast)
from tests.helpers import (assert_mesh_equals_one_device, digits_config, fixed_batch,
                           loss_before_and_after, preempt_at)

STEPS = 6


def contrastive_config(objective="simclr", **overrides):
  """digits_config (cnn_small (8, 16), batch 16) for a few SimCLR/SupCon steps."""
  config = digits_config(objective=objective, total_steps=STEPS, log_every=STEPS,
                         checkpoint_every=100, optim__lr=1e-2, **overrides)
  config.contrastive = contrastive.default_config()
  config.contrastive.projection_dims = (16, 8)
  config.augment = augment.default_config()
  return config


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
  """SimCLR trained STEPS steps on 8 devices: (config, workdir, final state)."""
  workdir = tmp_path_factory.mktemp("simclr")
  config = contrastive_config()
  return config, workdir, train.train(config, str(workdir))


def test_simclr_loss_decreases_and_params_are_laid_out_like_a_classifier(simclr_run):
  config, _, state = simclr_run
  _, before, after = loss_before_and_after(config, state)
  assert after < before - 0.05, (before, after)
  paths = masks.leaf_paths(state.params, "params")
  assert "params/backbone/stage1/conv/kernel" in paths
  assert {p.split("/")[1] for p in paths} == {"backbone", "projection", "online_probe"}
  assert masks.leaf_paths(state.model_state, "model_state")[0].startswith(
      "model_state/batch_stats/backbone/")


def test_simclr_eight_devices_equal_one_device(simclr_run):
  """Three trainer steps from the same variables on 8 devices and on 1 (loss, params and BatchNorm
  statistics within 1e-5). The 8-device programs are the fixture run's, from the cache."""
  config, _, _ = simclr_run
  assert_mesh_equals_one_device(config)


def test_simclr_resume_is_exact(simclr_run, tmp_path, monkeypatch):
  config, _, straight = simclr_run
  preempt_at(monkeypatch, STEPS // 2)
  train.train(config, str(tmp_path))
  assert checkpoint.completed_steps(tmp_path) == [STEPS // 2]
  monkeypatch.undo()
  resumed = train.train(config, str(tmp_path))
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)),
                  jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)


def test_simclr_checkpoint_is_the_init_from_of_a_linear_probe(simclr_run):
  config, workdir, state = simclr_run
  # transfer_digits as it is (dont_load=('params/head/.*',)) with the run's backbone.
  probe_config = digits_config("linear_probe", model__widths=config.model.widths)
  probe_config.init_from.workdir = str(workdir)
  s = train.setup(probe_config, fixed_batch(probe_config))
  params, model_state = train.load_transfer_source(s)  # raises if anything does not fit
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params["backbone"])),
                  jax.tree.leaves(params["backbone"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.model_state)),
                  jax.tree.leaves(model_state)):
    np.testing.assert_array_equal(a, b)
  # The head is left to the fresh init; projection and online probe are not in the classifier.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params["head"]))
  assert set(params) == {"backbone", "head"}
  # So a supervised model's `features` on these weights are SimCLR's: kNN/probes compare alike.
  images = fixed_batch(config)["image"]
  simclr_features = jax.jit(build_objective(config).features)(state.params, state.model_state,
                                                              images)
  params["head"] = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params["head"])
  np.testing.assert_allclose(jax.jit(s.objective.features)(params, model_state, images),
                             simclr_features, rtol=1e-5, atol=1e-6)


def test_knn_and_probe_from_the_checkpoint_equal_numpy_references(simclr_run):
  """`evaluate_checkpoints` on the SimCLR run's checkpoint: the few-shot protocol (2 shots of digits
  5-9, scored on all test digits 5-9) and the source classes, against plain numpy kNN / ridge on
  the encoder features of the same images."""
  config, workdir, state = simclr_run
  config = config.copy_and_resolve_references()
  few_shot = dict(labels=(5, 6, 7, 8, 9), shots=2, shots_seed=1)
  config.evals = ml_collections.ConfigDict(dict(
      knn=dict(type="knn", data=few_shot, k=3, tag="5-9"),
      probe=dict(type="linear_probe", data=few_shot, tag="5-9"),
      knn_source=dict(type="knn"),
      # The raw-pixel baseline of the contrastive table: the same protocol on the flattened images.
      knn_pixels=dict(type="knn", data=few_shot, k=3, tag="pixels", input="pixels"),
      probe_pixels=dict(type="linear_probe", data=few_shot, tag="pixels", input="pixels")))
  row, = evaluate.evaluate_checkpoints(config, str(workdir))
  features = jax.jit(build_objective(config).features)

  def split(data_overrides, name, pixels=False):
    data_config = config.data.copy_and_resolve_references()
    data_config.update(data_overrides)
    images, targets = pipeline.load_in_memory(data_config, name)
    images = images.astype(np.float32) / 255
    if pixels:
      return images.reshape(len(images), -1), targets["label"]
    return np.asarray(features(state.params, state.model_state, images)), targets["label"]

  bank_x, bank_y = split(few_shot, "train")
  assert len(bank_y) == 10  # 2 shots of 5 classes
  x, y = split(few_shot, "test")
  expected = np.mean(references.np_knn(bank_x, bank_y, x, 3, 0.07, 5) == y)
  assert row["test/5-9/knn_accuracy"] == pytest.approx(expected)
  expected = np.mean(references.np_ridge(bank_x, bank_y, x, 1e-3, 5) == y)
  assert row["test/5-9/linear_probe_accuracy"] == pytest.approx(expected)
  bank_x, bank_y = split({}, "train")
  x, y = split({}, "test")
  expected = np.mean(references.np_knn(bank_x, bank_y, x, 20, 0.07, 5) == y)
  assert row["test/knn_accuracy"] == pytest.approx(expected)
  bank_x, bank_y = split(few_shot, "train", pixels=True)
  x, y = split(few_shot, "test", pixels=True)
  assert bank_x.shape == (10, 64)
  expected = np.mean(references.np_knn(bank_x, bank_y, x, 3, 0.07, 5) == y)
  assert row["test/pixels/knn_accuracy"] == pytest.approx(expected)
  expected = np.mean(references.np_ridge(bank_x, bank_y, x, 1e-3, 5) == y)
  assert row["test/pixels/linear_probe_accuracy"] == pytest.approx(expected)
  assert row["test/pixels/knn_accuracy"] != row["test/5-9/knn_accuracy"]  # not the encoder's


def test_supcon_trains(tmp_path):
  config = contrastive_config("supcon")  # the online probe stays: SimCLR's init program, cached
  state = train.train(config, str(tmp_path))
  _, before, after = loss_before_and_after(config, state)
  assert after < before - 0.05, (before, after)


def np_nt_xent(z, t):
  """SimCLR eq. 1 for z [B, 2, D], averaged over the 2B anchors (float64 loops)."""
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  flat = z.reshape(-1, z.shape[-1])
  total = 0.0
  for i in range(len(flat)):
    partner = i + 1 if i % 2 == 0 else i - 1
    others = [j for j in range(len(flat)) if j != i]
    logits = np.array([flat[i] @ flat[j] for j in others]) / t
    total -= flat[i] @ flat[partner] / t - np.log(np.sum(np.exp(logits)))
  return total / len(flat)


def np_supcon_out(z, labels, t):
  """Khosla et al. eq. 2 for z [B, V, D], averaged over the B*V anchors (float64 loops): each anchor
  averages -log softmax over its positives, every other embedding of its label."""
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  flat, flat_labels = z.reshape(-1, z.shape[-1]), np.repeat(labels, z.shape[1])
  total = 0.0
  for i in range(len(flat)):
    others = [j for j in range(len(flat)) if j != i]
    log_denominator = np.log(np.sum([np.exp(flat[i] @ flat[j] / t) for j in others]))
    positives = [j for j in others if flat_labels[j] == flat_labels[i]]
    total -= np.mean([flat[i] @ flat[p] / t - log_denominator for p in positives])
  return total / len(flat)


@pytest.mark.parametrize("objective", ["simclr", "supcon", "supcon_shared_labels"])
def test_loss_matches_a_reference_on_independently_computed_views(objective):
  """The objective's views, projections and loss, against views from `augment.views` run through the
  model one view at a time and a plain loss (NT-Xent here; SupCon with each example its own class,
  where it reduces to NT-Xent; SupCon with two examples per class against eq. 2 written out, which
  differs from NT-Xent there). The online probe's loss adds, but never reaches the encoder."""
  shared_labels = objective == "supcon_shared_labels"
  objective = "supcon" if shared_labels else objective
  # An MLP without BatchNorm: examples are independent, so the views can go one at a time.
  config = contrastive_config(objective, model__name="mlp", model__widths=None)
  config.model.hidden = (16,)
  config.contrastive.temperature = 0.5
  obj = build_objective(config)
  images = fixed_batch(config)["image"][:6]
  labels = np.arange(6, dtype=np.int32) % 5  # the online probe has model.num_classes = 5 classes
  batch = {"image": images, "label": labels}
  if objective == "supcon" and not shared_labels:  # distinct: the positives are the other views
    batch["label"] = np.arange(6, dtype=np.int32)
    obj.model = obj.model.clone(probe_classes=6)
  if shared_labels:  # classes 0 1 2 0 1 2: three positives per anchor
    batch["label"] = np.arange(6, dtype=np.int32) % 3
  params, model_state = jax.jit(obj.init)(jax.random.key(0), batch)  # eager init: ~50 compiles
  rng = jax.random.key(3)
  trainable = jax.tree.map(lambda _: True, params)

  @jax.jit
  def objective_and_reference_views(params):
    def probe_loss(p):
      total, (_, metrics) = obj.loss(p, model_state, batch, rng, trainable=trainable)
      return metrics["probe_loss"], (total, metrics)
    probe_grads, (total, metrics) = jax.grad(probe_loss, has_aux=True)(params)
    views = augment.views(jnp.asarray(images), jax.random.fold_in(rng, 0), config.augment, 2)
    z = jnp.stack([obj.model.apply({"params": params}, views[:, v])[1] for v in range(2)], axis=1)
    return total, metrics, probe_grads, z

  total, metrics, probe_grads, z = jax.device_get(objective_and_reference_views(params))
  if shared_labels:
    expected = np_supcon_out(np.float64(z), batch["label"], 0.5)
    # The labels matter here: the two differ by far more than the tolerance below.
    assert abs(expected - np_nt_xent(np.float64(z), 0.5)) > 20 * 1e-4 * expected
  else:
    expected = np_nt_xent(np.float64(z), 0.5)
  np.testing.assert_allclose(metrics["contrastive_loss"], expected, rtol=1e-4)
  np.testing.assert_allclose(total, metrics["contrastive_loss"] + metrics["probe_loss"], rtol=1e-6)
  # The probe trains (its own gradient) on stop_gradient(features): nothing reaches the encoder.
  assert np.abs(probe_grads["online_probe"]["kernel"]).max() > 1e-3
  assert not any(np.any(g) for g in jax.tree.leaves(probe_grads["backbone"]))
  assert not any(np.any(g) for g in jax.tree.leaves(probe_grads["projection"]))


@pytest.mark.parametrize("section, key, value, message", [
    ("contrastive", "temprature", 0.1, "did you mean 'temperature'"),
    ("contrastive", "temperature", 0.0, "contrastive.temperature"),
    ("contrastive", "num_views", 1, "contrastive.num_views"),
    ("contrastive", "supcon_form", "both", "supcon_form"),
    ("contrastive", "projection_dims", (16, 0), "projection_dims"),
    ("augment", "crop_prob", 2.0, "augment.crop_prob"),
])
def test_bad_options_are_one_line_config_errors(section, key, value, message):
  config = contrastive_config()
  config[section][key] = value
  with pytest.raises(ConfigError, match=message):
    build_objective(config)
