"""Distillation: the KD loss against numpy and its T^2 scaling, and the `distill` objective in the
trainer (teacher bit-identical, no teacher backward pass, sharded == one device, student export),
and the teacher's arrival through the trainer's transfer-init seam (the objective reads no storage)."""
import ast
import itertools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import distill_digits
from jtl import checkpoint, data, evaluate, masks, objectives, student_export, train
from jtl.errors import ConfigError
from jtl.losses import distill as distill_losses
from jtl.metric_writer import read_jsonl
from jtl.objectives import distill as distill_objective
from jtl.sharding import to_global


def np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# --- the loss ------------------------------------------------------------------------------------

def test_kd_loss_equals_t_squared_kl_of_the_softened_distributions():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(4, 5)) * 3, rng.normal(size=(4, 5)) * 3
  for t in (1.0, 2.5):
    log_p, log_q = np_log_softmax(teacher / t), np_log_softmax(student / t)
    expected = t * t * np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    np.testing.assert_allclose(distill_losses.kd_loss(jnp.asarray(student, jnp.float32),
                                                      jnp.asarray(teacher, jnp.float32), t),
                               expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distill_losses.kd_loss(teacher, teacher, 3.0), 0.0, atol=1e-6)


def test_t_squared_keeps_the_soft_gradient_magnitude_across_temperatures():
  """Hinton et al. Sec. 2: dKL/dz_s shrinks ~1/T^2; T^2 KL's gradient tends to (z_s - z_t) / N
  (zero-mean logits) for large T, the same order for T = 1, 4, 8."""
  rng = np.random.default_rng(1)
  student = rng.normal(size=(1, 10)).astype(np.float32)
  teacher = rng.normal(size=(1, 10)).astype(np.float32)
  scaled, unscaled = {}, {}
  for t in (1.0, 4.0, 8.0):
    scaled[t] = np.asarray(jax.grad(lambda z: distill_losses.kd_loss(z, teacher, t).sum())(student))
    unscaled[t] = np.asarray(jax.grad(
        lambda z: distill_losses.soft_target_kl(z, teacher, t).sum())(student))
  norms = {t: np.linalg.norm(g) for t, g in scaled.items()}
  assert max(norms.values()) / min(norms.values()) < 3.0, norms
  for t in (4.0, 8.0):  # without T^2 the gradient falls like 1/T^2
    ratio = np.linalg.norm(unscaled[t]) / np.linalg.norm(unscaled[1.0])
    assert ratio < 3.0 / t ** 2, (t, ratio)
  centred = (student - student.mean()) - (teacher - teacher.mean())
  np.testing.assert_allclose(scaled[8.0], centred / 10, rtol=0.1, atol=2e-3)  # the high-T limit


# --- the objective in the trainer ----------------------------------------------------------------

TEACHER = dict(name="mlp", num_classes=10, hidden=(64, 64), use_bn=True)  # BatchNorm: stats to keep


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A supervised teacher on all ten digits: two steps are enough to be a checkpoint."""
  workdir = tmp_path_factory.mktemp("teacher")
  config = distill_digits.get_config("mode=teacher")
  config.model = ml_collections.ConfigDict(TEACHER)
  config.update_from_flattened_dict({"total_steps": 2, "batch_size": 16, "log_every": 2,
                                     "checkpoint_every": 2, "optim.warmup_steps": 1,
                                     "mesh.axes": (("data", 1),)})
  train.train(config, str(workdir))
  return workdir


def distill_config(teacher_dir, **overrides):
  config = distill_digits.get_config(f"mode=kd,teacher={teacher_dir}")
  config.update_from_flattened_dict({"total_steps": 4, "batch_size": 16, "log_every": 2,
                                     "checkpoint_every": 4, "model.hidden": (8,),
                                     "optim.warmup_steps": 1})
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return config


@pytest.fixture(scope="module")
def batches(teacher_dir):
  config = distill_config(teacher_dir)
  return list(itertools.islice(data.train_iterator(config.data, global_batch_size=16, seed=0), 2))


def build(config, batches):
  return train.setup(config, batches[0])


def step_zero_variables(s):
  """The step-0 variables the trainer starts from: the teacher loaded through the transfer-init seam."""
  return jax.device_get(train.init_variables(s, train.load_transfer_source(s)))


def test_alpha_zero_is_plain_cross_entropy(teacher_dir, batches):
  s = build(distill_config(teacher_dir, distill__alpha=0.0, mesh__axes=(("data", 1),)), batches)
  params, model_state = jax.device_get(train.fresh_variables(s))
  batch = batches[0]
  objective = s.objective

  def student_ce(student_params):  # written here from the student's logits alone
    logits = objective.student.apply({"params": student_params}, batch["image"], train=True)
    log_q = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_q, batch["label"][:, None], axis=1))

  def distill_loss(student_params):
    return objective.loss({**params, "student": student_params}, model_state, batch,
                          jax.random.key(0), trainable=s.trainable)[0]

  both = jax.jit(lambda p: (jax.value_and_grad(student_ce)(p), jax.value_and_grad(distill_loss)(p)))
  (expected, expected_grads), (value, grads) = both(params["student"])
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unlabelled_members_are_distilled_with_alpha_one_and_their_labels_unread(teacher_dir,
                                                                               batches):
  config = distill_config(teacher_dir)
  config.data.mixture = ml_collections.ConfigDict({"labelled": {}, "unlabelled": {}})
  config.distill.unlabelled = ("unlabelled",)
  plain = batches[0]
  batch = {"labelled": {"image": plain["image"][:8], "label": plain["label"][:8]},
           "unlabelled": {"image": plain["image"][8:], "label": np.full(8, 99, np.int32)}}
  s = train.setup(config, batch)
  objective = s.objective
  params, model_state = step_zero_variables(s)
  trainable = masks.trainable_mask(params, config.trainable)
  loss, (_, metrics) = jax.jit(lambda p: objective.loss(p, model_state, batch, jax.random.key(0),
                                                        trainable=trainable))(params)
  student = np.asarray(objective.student.apply({"params": params["student"]}, plain["image"]),
                       np.float64)
  teacher = np.asarray(objective.teacher.apply({"params": params["teacher"],
                                                **model_state["teacher"]}, plain["image"]),
                       np.float64)
  alpha, t = config.distill.alpha, config.distill.temperature
  log_p, log_q = np_log_softmax(teacher / t), np_log_softmax(student / t)
  kd = t * t * np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
  ce = -np_log_softmax(student)[np.arange(8), plain["label"][:8]]
  expected = (np.sum((1 - alpha) * ce + alpha * kd[:8]) + np.sum(kd[8:])) / 16
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce_loss"], ce.mean(), rtol=1e-5)
  # Accuracies over the labelled rows, each from its own model's logits.
  labels = plain["label"][:8]
  teacher_hits, student_hits = (np.argmax(z[:8], 1) == labels for z in (teacher, student))
  assert teacher_hits.mean() != student_hits.mean()  # so the two checks below can tell them apart
  np.testing.assert_allclose(metrics["teacher_accuracy"], teacher_hits.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], student_hits.mean(), rtol=1e-6)
  # ... and per example in evaluation.
  per_example = jax.jit(objective.eval_metrics)(params, model_state, batch)
  np.testing.assert_array_equal(per_example["labelled/teacher_accuracy"], teacher_hits)
  np.testing.assert_array_equal(per_example["labelled/accuracy"], student_hits)
  np.testing.assert_array_equal(per_example["labelled/agreement"],
                                np.argmax(teacher[:8], 1) == np.argmax(student[:8], 1))


def test_training_keeps_the_teacher_bit_identical_and_evaluates_the_student(teacher_dir, batches,
                                                                            tmp_path):
  config = distill_config(teacher_dir, mesh__axes=(("data", 1),))
  state = train.train(config, str(tmp_path / "kd"))
  _, teacher = checkpoint.load_variables(teacher_dir)
  params, model_state = jax.device_get((state.params, state.model_state))
  assert teacher["model_state"]["batch_stats"], "the teacher has BatchNorm"
  for got, want in ((params["teacher"], teacher["params"]),
                    (model_state["teacher"], teacher["model_state"])):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  opt_paths = masks.leaf_paths(state.opt_state, "opt_state")
  assert opt_paths and not any("teacher" in p for p in opt_paths)  # no optimizer state for it
  evaluate.evaluate_checkpoints(None, str(tmp_path / "kd"))
  row = read_jsonl(tmp_path / "kd" / "eval_metrics.jsonl")[-1]
  # The student, exported, evaluates as a supervised run to the same accuracy.
  student_export.export_student(str(tmp_path / "kd"), str(tmp_path / "student"))
  evaluate.evaluate_checkpoints(None, str(tmp_path / "student"))
  exported = read_jsonl(tmp_path / "student" / "eval_metrics.jsonl")[-1]
  assert exported["step"] == row["step"] == 4
  assert exported["test/accuracy"] == pytest.approx(row["test/accuracy"], abs=1e-6)
  # The teacher's accuracy is the one its own (supervised) evaluation gives on the same split.
  evaluate.evaluate_checkpoints(None, str(teacher_dir))
  teacher_row = read_jsonl(teacher_dir / "eval_metrics.jsonl")[-1]
  assert row["test/num_examples"] == teacher_row["test/num_examples"]
  assert row["test/teacher_accuracy"] == pytest.approx(teacher_row["test/accuracy"], abs=1e-6)
  assert row["test/teacher_accuracy"] != pytest.approx(row["test/accuracy"], abs=1e-3)
  # ... and is an init_from source for a supervised run of the same model.
  s = train.setup(student_export.student_config(config), batches[0])
  loaded, _, report = checkpoint.transfer_init(
      s.abstract_state.params, s.abstract_state.model_state,
      ml_collections.ConfigDict({"workdir": str(tmp_path / "student"), "dont_load": ()}))
  np.testing.assert_array_equal(loaded["head"]["kernel"], params["student"]["head"]["kernel"])
  assert "unexpected (ignored) 0" in report


def test_the_frozen_teacher_costs_no_backward_pass(teacher_dir, batches, monkeypatch):
  one_device = (("data", 1),)
  frozen = build(distill_config(teacher_dir, mesh__axes=one_device), batches)
  monkeypatch.setattr(distill_objective, "_check_teacher_frozen", lambda rules: None)
  trainable = build(distill_config(teacher_dir, trainable=((".*", True),), mesh__axes=one_device),
                    batches)

  def flops(s):
    step = train.make_train_step(s)
    return step.lower(s.abstract_state, s.abstract_batch).compile().cost_analysis()["flops"]

  teacher = frozen.objective.teacher
  teacher_forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False)).lower(
      {"params": frozen.abstract_state.params["teacher"],
       **frozen.abstract_state.model_state["teacher"]},
      frozen.abstract_batch["image"]).compile().cost_analysis()["flops"]
  frozen_flops, trainable_flops = flops(frozen), flops(trainable)
  # A teacher backward pass costs about twice its forward pass; the frozen step has none of it, and
  # is one teacher forward plus the (8-unit) student's step.
  assert trainable_flops - frozen_flops > 1.2 * teacher_forward, (trainable_flops, frozen_flops)
  assert frozen_flops < 1.5 * teacher_forward, (frozen_flops, teacher_forward)


def test_eight_device_step_equals_one_device_step(teacher_dir, batches):
  assert jax.device_count() == 8
  results, variables = [], None
  for axes in ((("data", 1),), (("data", 8),)):
    s = build(distill_config(teacher_dir, mesh__axes=axes), batches)
    variables = variables or jax.device_get(train.fresh_variables(s))
    state = train.initial_state(s, *variables)
    step = train.make_train_step(s)
    for batch in batches:
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    results.append(jax.device_get((state.params, state.model_state, metrics["loss"])))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bad_distill_configs_are_one_line_errors(teacher_dir, tmp_path):
  cases = [
      ({"trainable": ((".*", True),)}, "teacher frozen"),
      ({"distill.alpha": 1.5}, "distill.alpha"),
      ({"distill.temperature": 0.0}, "distill.temperature"),
      ({"distill.teacher_workdir": str(tmp_path)}, "has no config.json with a model"),
      ({"model.num_classes": 5}, "classes"),
      ({"data.normalize": ((0.5,), (0.25,))}, "teacher was trained with data.normalize"),
  ]
  for overrides, message in cases:
    config = distill_config(teacher_dir)
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ConfigError, match=message):
      objectives.build(config)


def test_the_teacher_arrives_through_the_transfer_init_seam(teacher_dir, batches):
  """The objective declares the teacher; the trainer's loading seam (as for `init_from`) fills
  `params/teacher` and `model_state/teacher` with the checkpoint, bit for bit; the objective's own
  init is only the structure (a random teacher)."""
  s = build(distill_config(teacher_dir, mesh__axes=(("data", 1),)), batches)
  (declared,) = s.objective.loaded_weights()
  assert (declared.key, declared.workdir) == ("teacher", str(teacher_dir))
  _, teacher = checkpoint.load_variables(teacher_dir)
  params, model_state = step_zero_variables(s)
  fresh_params, _ = jax.device_get(train.fresh_variables(s))
  for got, want in ((params["teacher"], teacher["params"]),
                    (model_state["teacher"], teacher["model_state"])):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(fresh_params["teacher"]["backbone"]["dense0"]["kernel"],
                            teacher["params"]["backbone"]["dense0"]["kernel"])
  for a, b in zip(jax.tree.leaves(params["student"]), jax.tree.leaves(fresh_params["student"])):
    np.testing.assert_array_equal(a, b)  # the student: the fresh init (no init_from)


def test_a_teacher_that_cannot_be_loaded_stops_the_run_before_anything_is_written(teacher_dir,
                                                                                 tmp_path):
  no_checkpoints = tmp_path / "no_checkpoints"  # the teacher's config.json, no checkpoint
  no_checkpoints.mkdir()
  shutil.copy(teacher_dir / "config.json", no_checkpoints / "config.json")
  other_teacher = dict(TEACHER, hidden=(32, 64))
  cases = [
      ({"distill.teacher_workdir": str(no_checkpoints)},
       f"no teacher checkpoint in {no_checkpoints}; train the teacher there first or fix "
       "--config.distill.teacher_workdir"),
      ({"distill.teacher_step": 99}, r"no teacher checkpoint for step 99 in .*available: \[2\] "
       r"\(--config.distill.teacher_step\)"),
      ({"distill.teacher_model": ml_collections.ConfigDict(other_teacher)},
       "shape mismatch.*fix distill.teacher_model or distill.teacher_workdir"),
  ]
  for i, (overrides, message) in enumerate(cases):
    config = distill_config(teacher_dir, mesh__axes=(("data", 1),))
    config.update_from_flattened_dict({k: v for k, v in overrides.items()
                                       if k != "distill.teacher_model"})
    if "distill.teacher_model" in overrides:
      config.distill.teacher_model = overrides["distill.teacher_model"]
    workdir = tmp_path / f"run{i}"
    with pytest.raises(ConfigError, match=message) as e:
      train.train(config, str(workdir))
    assert "\n" not in str(e.value)
    assert not workdir.exists()


STORAGE_MODULES = ("jtl.checkpoint", "jtl.keep", "jtl.lock", "jtl.student_export", "jtl.pretrained",
                   "jtl.remote", "orbax", "tensorstore", "etils.epath")


def _imports(path):
  """Every module a file imports (`import a.b`, `from a import b` as both `a` and `a.b`)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_objectives_import_no_storage_code():
  """Objectives know nothing about checkpoints (DESIGN.md): no module of jtl/objectives imports
  checkpoint, workdir or file-layer code; weights from other runs come through the trainer."""
  files = sorted(pathlib.Path(objectives.__file__).parent.glob("*.py"))
  assert len(files) >= 10
  for path in files:
    bad = sorted(n for n in _imports(path)
                 if any(n == m or n.startswith(m + ".") for m in STORAGE_MODULES))
    assert not bad, f"{path.name} imports storage code: {bad}"
