"""Knowledge distillation (`objective="distill"`): a small student learns from a trained, frozen teacher.

Loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", Sec. 2): per
example (1 - alpha) CE(label, z_s) + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the
batch (`jtl.losses.distill`). alpha and T come from `config.distill`.

Conventions:
* Two registry models, two keys: `params/teacher/...` and `model_state/teacher/...` hold the teacher,
  `params/student/...` and `model_state/student/...` the student (`config.model`). Below each key the
  tree is exactly a supervised `Classifier`'s (`backbone/...`, `head/...`, `batch_stats/backbone/...`).
* The teacher comes from another run's checkpoint (`distill.teacher_workdir`, optional
  `teacher_step`; its model config from that run's `config.json`, or `distill.teacher_model`). The
  objective only declares it (`loaded_weights`: the `teacher` entry of params and model_state, from
  that run); the trainer's transfer-init seam, the one `init_from` goes through, reads it and
  places it in the step-0 state, checked against the teacher model's shapes (ConfigError, before
  anything is written): step 0 holds the trained teacher, never a random one. This module never
  touches storage. Both models read the same images, so the teacher's run must have preprocessed
  them alike (`data.normalize`, `data.image_size`: checked). A resumed or evaluated run reads the
  teacher from its own checkpoints.
* The teacher is frozen by the mask, like any frozen leaf: `from_config` requires
  `("params/teacher/.*", False)` as the first rule of `config.trainable` (the config files write it),
  so the trainer differentiates the student only (no teacher backward pass, no optimizer state). A
  fully frozen teacher runs in inference mode (`train=False`): BatchNorm on its running statistics,
  which stay bit-identical, no dropout. Its logits are not `stop_gradient`ed: the mask alone is what
  keeps gradients out of it, as for every frozen part of every objective.
* Batches: `{'image', 'label'}`, or a data mixture `{member: {'image', ...}}` (`config.data.mixture`).
  Members named in `distill.unlabelled` are distilled with alpha = 1 and their labels are never read
  (a transfer set without labels); the others use `alpha`. All members go through each model as one
  batch; the loss is the mean over every example of the step.
* Metrics: train `loss`, `ce_loss` (labelled examples), `kd_loss` (all), `accuracy` and
  `teacher_accuracy` (labelled). Eval, per example: student `loss` (CE) and `accuracy`,
  `teacher_accuracy` (for reference), `agreement` (same top-1), `kd_loss`; prefixed `<member>/` when
  evaluated on a mixture member.
* The student evaluates and transfers like any checkpoint through `jtl.student_export.export_student(
  workdir, out)`, which
  writes `out/config.json` (a supervised run of the student model) and `out/checkpoints/<step>/` with
  the student's variables at the top level (`params/backbone/...`): `experiments.evaluate
  --workdir=out` and `init_from.workdir=out` then work as for a supervised run. (`init_from` matches
  paths exactly, so it cannot read `params/student/...` from the distillation run itself.)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jtl import config as config_lib
from jtl import losses, models
from jtl.errors import ConfigError
from jtl.losses import distill as distill_losses
from jtl.objectives.base import LoadedWeights, Metrics, Objective, PyTree, apply_model

TEACHER_RULE = ("params/teacher/.*", False)


def default_config() -> ml_collections.ConfigDict:
  """`config.distill`: every option, with its default."""
  return ml_collections.ConfigDict(dict(
      teacher_workdir=None,  # workdir of the teacher's run (required)
      teacher_step=None,  # its checkpoint step; None: the latest
      teacher_model=None,  # the teacher's model config; None: from teacher_workdir/config.json
      alpha=0.5,  # weight of the soft-target term, in [0, 1] (0: plain cross-entropy)
      temperature=4.0,  # T > 0 of the soft targets (Hinton et al.: 1 to 20)
      unlabelled=(),  # mixture members distilled with alpha = 1, labels never read
  ))


def _check_teacher_frozen(rules: Any) -> None:
  first = None if isinstance(rules, str) or not rules else tuple(rules[0])
  if first != TEACHER_RULE:
    raise ConfigError(f"distill needs the teacher frozen: make {TEACHER_RULE!r} the first rule of "
                      f"config.trainable (got {rules!r})")


class Distill(Objective):
  """Student (`params/student`) trained on labels and a frozen teacher's (`params/teacher`) logits."""

  def __init__(self, student: nn.Module, teacher: nn.Module, teacher_workdir: str, *,
               teacher_step: int | None = None, alpha: float = 0.5, temperature: float = 4.0,
               unlabelled: tuple[str, ...] = ()):
    self.student, self.teacher = student, teacher
    self.teacher_workdir, self.teacher_step = teacher_workdir, teacher_step
    self.alpha, self.temperature = float(alpha), float(temperature)
    self.unlabelled = tuple(unlabelled)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Distill":
    """Validates `config.distill` and the mask, reads the teacher's run config; loads no weights
    (the trainer does, `loaded_weights`)."""
    o = config_lib.section_options(config, "distill", default_config())
    config_lib.check_number(o["alpha"], "distill.alpha", low=0.0, high=1.0)
    config_lib.check_number(o["temperature"], "distill.temperature", low=0.0, low_open=True)
    config_lib.check_positive_int(o["teacher_step"], "distill.teacher_step", allow_none=True,
                                  minimum=0)
    workdir = o["teacher_workdir"]
    if not isinstance(workdir, str) or not workdir:
      raise ConfigError("distill.teacher_workdir is not set; point it at the teacher's run "
                        "(--config.distill.teacher_workdir=DIR)")
    teacher_model = o["teacher_model"]
    run = config_lib.load_run_config(workdir)
    if teacher_model is None:
      if run is None or "model" not in run:
        raise ConfigError(f"{workdir} has no config.json with a model; set config.distill."
                          "teacher_model = dict(name=..., num_classes=..., ...) in the config file")
      teacher_model = run.model
      if run.get("objective", "supervised") != "supervised":
        raise ConfigError(f"the teacher run {workdir} has objective {run.objective!r}; distill "
                          "needs a supervised teacher (its params/backbone and params/head)")
    if run is not None and "data" in run:  # the teacher must see its inputs as it was trained
      for key in ("normalize", "image_size"):
        theirs, ours = (config_lib.as_plain({"v": c.get(key)})["v"] for c in (run.data, config.data))
        if theirs != ours:
          raise ConfigError(f"the teacher was trained with data.{key}={theirs!r}, this run has "
                            f"{ours!r}; set --config.data.{key} to the teacher's")
    teacher = models.build(teacher_model)
    student = models.build(config.model)
    for role, model in (("teacher", teacher), ("student", student)):
      if not getattr(model, "num_classes", None):
        raise ConfigError(f"the {role} model has no classification head (num_classes="
                          f"{getattr(model, 'num_classes', None)!r}); set its model.num_classes")
    if teacher.num_classes != student.num_classes:
      raise ConfigError(f"teacher has {teacher.num_classes} classes, student {student.num_classes}; "
                        "set --config.model.num_classes to the teacher's")
    unlabelled = tuple(o["unlabelled"] or ())
    mixture = dict(config.data.get("mixture") or {})
    unknown = [m for m in unlabelled if m not in mixture]
    if unknown:
      raise ConfigError(f"distill.unlabelled names {unknown}, not members of data.mixture "
                        f"({sorted(mixture)}); fix --config.distill.unlabelled")
    _check_teacher_frozen(config.trainable)
    return cls(student, teacher, workdir, teacher_step=o["teacher_step"], alpha=o["alpha"],
               temperature=o["temperature"], unlabelled=unlabelled)

  # --- the teacher's weights -------------------------------------------------------------------

  def loaded_weights(self) -> tuple[LoadedWeights, ...]:
    """The teacher: `params/teacher` and `model_state/teacher` from the teacher run's checkpoint."""
    return (LoadedWeights(key="teacher", workdir=self.teacher_workdir, step=self.teacher_step,
                          role="teacher", workdir_option="distill.teacher_workdir",
                          step_option="distill.teacher_step",
                          fix="fix distill.teacher_model or distill.teacher_workdir"),)

  # --- batches and models ----------------------------------------------------------------------

  @staticmethod
  def _parts(batch: PyTree) -> list[tuple[str | None, dict]]:
    """[(member or None, its batch)]: one part for a plain batch, one per member of a mixture."""
    if "image" in batch:
      return [(None, batch)]
    return [(name, batch[name]) for name in sorted(batch)]

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    """Fresh student and teacher variables. The teacher's are placeholders of the right structure:
    the trainer fills them from the teacher's checkpoint (`loaded_weights`)."""
    images = jnp.zeros_like(self._parts(batch)[0][1]["image"][:1])
    student = dict(self.student.init(rng, images, train=False))
    teacher = dict(self.teacher.init(jax.random.fold_in(rng, 1), images, train=False))
    params = {"student": student.pop("params"), "teacher": teacher.pop("params")}
    return params, {"student": student, "teacher": teacher}

  def _teacher_logits(self, params, model_state, images, trainable, rng):
    """Teacher logits; a fully frozen teacher runs in inference mode and keeps its state as is."""
    teacher_mask = trainable["teacher"] if trainable is not None else None
    if teacher_mask is None or not any(jax.tree.leaves(teacher_mask)):
      logits, _ = apply_model(self.teacher, params["teacher"], model_state["teacher"], images,
                              train=False)
      return logits, model_state["teacher"]
    return apply_model(self.teacher, params["teacher"], model_state["teacher"], images, train=True,
                       trainable=teacher_mask, rng=rng)

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    parts = self._parts(batch)
    images = jnp.concatenate([part["image"] for _, part in parts])
    student_logits, student_state = apply_model(
        self.student, params["student"], model_state["student"], images, train=True,
        trainable=trainable["student"], rng=jax.random.fold_in(rng, 0))
    teacher_logits, teacher_state = self._teacher_logits(params, model_state, images, trainable,
                                                         jax.random.fold_in(rng, 1))
    kd = distill_losses.kd_loss(student_logits, teacher_logits, self.temperature)
    total, start = jnp.zeros((), jnp.float32), 0
    labelled_logits, labelled_teacher, labels = [], [], []
    for name, part in parts:
      rows = slice(start, start + part["image"].shape[0])
      start = rows.stop
      if name in self.unlabelled:  # labels never read: pure distillation on these inputs
        total = total + jnp.sum(kd[rows])
        continue
      ce = losses.softmax_cross_entropy(student_logits[rows], part["label"])
      total = total + jnp.sum((1.0 - self.alpha) * ce + self.alpha * kd[rows])
      labelled_logits.append(student_logits[rows])
      labelled_teacher.append(teacher_logits[rows])
      labels.append(part["label"])
    metrics = {"kd_loss": jnp.mean(kd)}
    if labels:
      s_logits, t_logits = jnp.concatenate(labelled_logits), jnp.concatenate(labelled_teacher)
      y = jnp.concatenate(labels)
      metrics.update(ce_loss=jnp.mean(losses.softmax_cross_entropy(s_logits, y)),
                     accuracy=jnp.mean(losses.accuracy(s_logits, y)),
                     teacher_accuracy=jnp.mean(losses.accuracy(t_logits, y)))
    new_state = {"student": student_state, "teacher": teacher_state}
    return total / images.shape[0], (new_state, metrics)

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    out = {}
    for name, part in self._parts(batch):
      student_logits, _ = apply_model(self.student, params["student"], model_state["student"],
                                      part["image"], train=False)
      teacher_logits, _ = apply_model(self.teacher, params["teacher"], model_state["teacher"],
                                      part["image"], train=False)
      prefix = f"{name}/" if name else ""
      labels = part["label"]
      agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
      out.update({
          f"{prefix}loss": losses.softmax_cross_entropy(student_logits, labels),
          f"{prefix}accuracy": losses.accuracy(student_logits, labels),
          f"{prefix}teacher_accuracy": losses.accuracy(teacher_logits, labels),
          f"{prefix}agreement": agree.astype(jnp.float32),
          f"{prefix}kd_loss": distill_losses.kd_loss(student_logits, teacher_logits,
                                                     self.temperature)})
    return out

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """The student's pooled backbone features [B, D] (what kNN and linear probes read)."""
    features, _ = apply_model(self.student, params["student"], model_state["student"], images,
                              train=False, method="features")
    return features
