"""Multitask learning: tasks (`config.tasks`), a sharing architecture, and one way to combine the tasks.

`config.multitask`:
  arch            hard | soft_l2 | soft_trace | cross_stitch | sluice | relationship | low_supervision
                  | adaptive (jtl/multitask/archs.py), with `arch_options`
  weighting       a loss weighting (equal | static | uncertainty | dwa | rlw | gradnorm | famo,
                  jtl/multitask/weighting.py) or a gradient aggregator (pcgrad | mgda | cagrad | imtl
                  | nash | upgrad, jtl/multitask/aggregators.py), with `weighting_options`
  grad_space      representation | shared_params: where aggregators (and GradNorm) take per-task
                  gradients
  phase_steps     > 0: train the tasks one at a time in phases of this many steps, lowest `depth`
                  first, cycling (Hashimoto et al.'s joint many-task schedule), with the successive
                  regularisation `successive_weight * ||theta_shared - theta_shared(phase start)||^2`

Batches: one dataset with one feature per task (`batch = {'image', <task.feature>, ...}`), or a data
mixture, one dataset per task (`batch = {task: {'image', <task.feature>}}`, `config.data.mixture`).

How the gradient is formed:
* Loss weightings: the weighted sum of the task losses (plus the architecture's penalties) is
  differentiated as usual, one backward pass. GradNorm first needs the per-task gradient norms: T cheap
  VJPs through the heads in representation space.
* Aggregators, representation space (Sener & Koltun's MGDA-UB trick, generalised): one forward through
  the shared trunk to z; the per-task gradients dL_t/dz from T VJPs through the heads only (vmapped);
  the T x T Gram matrix of those; task weights w from the aggregator, inside jit; then ONE backward
  pass through the trunk with the cotangent sum_t w_t dL_t/dz. Task-specific parameters (heads) get
  their own task's plain gradient. Needs an architecture with a shared representation.
* Aggregators, shared-params space (the exact per-parameter method, for reference): per-task gradients
  of every trainable parameter (T backward passes, `jax.jacrev`), the Gram matrix over the shared
  ones (all but `heads/`, `towers/`, `relationship/`, `label_embeddings/`: the task-specific parts),
  update
  sum_t w_t g_t on shared parameters and sum_t g_t on task-specific ones.
Architecture penalties (soft sharing, sluice orthogonality, relationship prior) always enter unweighted.
Scarce labels (`data.label_fraction`, jtl/data/labelled.py): a task whose feature is missing (-1) on
some training rows averages its error over the rows that have it (0 for a batch with none); every
weighting and aggregator then sees that loss. Under gradient accumulation each micro-batch averages
over its own labelled rows, and the step takes the mean of those means.
Metrics: `<task>/loss` (and eval metrics `<task>/<metric>`), `w_<t>` weights, `penalty_<name>`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jtl import masks
from jtl.data import labelled
from jtl.errors import ConfigError
from jtl.losses import likelihood
from jtl.multitask import aggregators, archs, weighting
from jtl.multitask.tasks import Task, parse_tasks
from jtl.objectives.base import (Metrics, Objective, PyTree, Step, apply_model, step_or_counter,
                                 step_rng)

GRAD_SPACES = ("representation", "shared_params")
# Top-level params/model_state entries that are not the architecture's (flax) variables.
_OWN_PARAMS, _OWN_STATE = ("weighting",), ("weighting", "successive")
# Top-level params that belong to one task each (not "shared" in shared_params space).
TASK_SPECIFIC = ("heads", "towers", "relationship", "label_embeddings", "weighting")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="hard", arch_options=ml_collections.ConfigDict(), weighting="equal",
      weighting_options=ml_collections.ConfigDict(), grad_space="representation", phase_steps=0,
      successive_weight=1e-2))


class Multitask(Objective):
  """Several tasks on one trunk (or several towers), combined by a loss weighting or an aggregator."""

  def __init__(self, tasks: tuple[Task, ...], model: Any, method: str,
               method_options: dict[str, Any], grad_space: str = "representation",
               phase_steps: int = 0, successive_weight: float = 0.0, mixture: bool = False,
               scarce: frozenset[str] = frozenset()):
    self.tasks, self.model, self.method, self.scarce = tasks, model, method, scarce
    self.grad_space, self.mixture = grad_space, mixture
    self.phase_steps, self.successive_weight = phase_steps, successive_weight
    if method in aggregators.AGGREGATORS:
      self.aggregate = aggregators.make_aggregator(method, **method_options)
      self.weighting = weighting.make_weighting("equal")
    else:
      self.aggregate = None
      self.weighting = weighting.make_weighting(method, **method_options)
    needs_grads = self.aggregate is not None or self.weighting.needs_grad_norms
    if needs_grads and grad_space == "representation":
      if not getattr(model, "shared_representation", False):
        raise ConfigError(f"weighting {method!r} in representation space needs an architecture with a "
                          f"shared representation, and {type(model).__name__} has none; set "
                          "--config.multitask.grad_space=shared_params")
      if mixture:
        raise ConfigError(f"weighting {method!r} in representation space needs every task on the same "
                          "inputs, but data.mixture gives each task its own; set "
                          "--config.multitask.grad_space=shared_params")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Multitask":
    tasks = parse_tasks(config.get("tasks"))
    mt = config.get("multitask") or default_config()
    options = {**default_config().to_dict(), **mt.to_dict()}
    if options["grad_space"] not in GRAD_SPACES:
      raise ConfigError(f"unknown multitask.grad_space {options['grad_space']!r}; use one of "
                        f"{', '.join(GRAD_SPACES)} (--config.multitask.grad_space)")
    methods = list(weighting.WEIGHTINGS) + list(aggregators.AGGREGATORS)
    if options["weighting"] not in methods:
      raise ConfigError(f"unknown multitask.weighting {options['weighting']!r}; choose one of "
                        f"{', '.join(methods)} (--config.multitask.weighting)")
    if not isinstance(options["phase_steps"], int) or options["phase_steps"] < 0:
      raise ConfigError(f"multitask.phase_steps must be an int >= 0, got {options['phase_steps']!r}")
    method_options = dict(options["weighting_options"] or {})
    if options["weighting"] == "static" and "weights" not in method_options:
      method_options["weights"] = tuple(t.weight for t in tasks)
    if options["weighting"] == "uncertainty" and "kinds" not in method_options:
      method_options["kinds"] = tuple("regression" if t.kind == "regression" else "classification"
                                      for t in tasks)
    model = archs.build(options["arch"], tasks, config.model, dict(options["arch_options"] or {}))
    mixture = bool(config.data.get("mixture"))
    if mixture:
      missing = [t.name for t in tasks if t.name not in config.data.mixture]
      if missing:
        raise ConfigError(f"data.mixture has no member for task(s) {', '.join(missing)}; name the "
                          "members after the tasks")
    scarce = frozenset(t.name for t in tasks if t.feature in labelled.hidden_features(config.data))
    for t in tasks:
      if t.name in scarce and t.kind not in ("multiclass", "binary"):
        raise ConfigError(f"task {t.name!r} is {t.kind}, and data.label_fraction hides labels of "
                          f"multiclass and binary tasks only; drop {t.feature!r} from "
                          "--config.data.label_fraction")
    return cls(tasks, model, options["weighting"], method_options, options["grad_space"],
               options["phase_steps"], float(options["successive_weight"]), mixture, scarce)

  # --- batches ---------------------------------------------------------------------------------

  def _inputs(self, batch: PyTree) -> tuple[jax.Array, dict[str, tuple[jax.Array, slice]]]:
    """(images for one trunk pass, {task: (targets, rows of that pass)}) for the tasks present."""
    if not self.mixture:
      return batch["image"], {t.name: (batch[t.feature], slice(None)) for t in self.tasks}
    images, targets, start = [], {}, 0
    for t in self.tasks:
      if t.name in batch:
        part = batch[t.name]
        n = part["image"].shape[0]
        images.append(part["image"])
        targets[t.name] = (part[t.feature], slice(start, start + n))
        start += n
    return jnp.concatenate(images), targets

  # --- the model -------------------------------------------------------------------------------

  @staticmethod
  def _arch(params: PyTree, model_state: PyTree) -> tuple[PyTree, PyTree]:
    return ({k: v for k, v in params.items() if k not in _OWN_PARAMS},
            {k: v for k, v in model_state.items() if k not in _OWN_STATE})

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    x, _ = self._inputs(batch)
    variables = self.model.init(rng, jnp.zeros_like(x[:1]), train=False)
    params = dict(variables.pop("params"))
    model_state = dict(variables)
    n = len(self.tasks)
    if own := self.weighting.init_params(n):
      params["weighting"] = own
    if own := self.weighting.init_state(n):
      model_state["weighting"] = own
    if self.phase_steps:
      model_state["successive"] = {"step": jnp.zeros((), jnp.int32),
                                   "snapshot": self._shared(params)}
    return params, model_state

  def _apply(self, params, model_state, x, *, train, trainable=None, rng=None, method=None):
    arch_params, arch_state = self._arch(params, model_state)
    (out, penalties), new_state = apply_model(self.model, arch_params, arch_state, x, train=train,
                                              trainable=trainable, rng=rng, method=method)
    return out, penalties, new_state

  @staticmethod
  def _shared(params: PyTree) -> PyTree:
    return {k: v for k, v in params.items() if k not in TASK_SPECIFIC}

  # --- losses ----------------------------------------------------------------------------------

  def _task_losses(self, outputs: dict[str, jax.Array], targets: dict) -> jax.Array:
    """[T] batch-mean errors, in task order (0 for a task absent from the batch)."""
    out = []
    for t in self.tasks:
      if t.name not in targets:
        out.append(jnp.zeros((), jnp.float32))
        continue
      y, rows = targets[t.name]
      if t.name not in self.scarce:
        out.append(likelihood.task_error(t.kind, outputs[t.name][rows], y, t.label_noise).mean())
        continue
      has = (y.reshape(y.shape[0], -1)[:, 0] != labelled.MISSING).astype(jnp.float32)
      error = likelihood.task_error(t.kind, outputs[t.name][rows], jnp.maximum(y, 0), t.label_noise)
      out.append(jnp.sum(error * has) / jnp.maximum(jnp.sum(has), 1.0))
    return jnp.stack(out)

  def _phase(self, model_state: PyTree, params: PyTree, step: Step | None = None
             ) -> tuple[jax.Array, jax.Array, PyTree]:
    """(task mask [T], successive penalty, new successive state) of the joint many-task schedule."""
    if not self.phase_steps:
      return jnp.ones(len(self.tasks)), jnp.zeros(()), None
    state = model_state["successive"]
    # The optimizer step (once per step under grad_accum_steps; base.py "One optimizer step").
    current = step_or_counter(step, state["step"])
    order = sorted(range(len(self.tasks)), key=lambda i: (self.tasks[i].depth or 10**6, i))
    phase = (current // self.phase_steps) % len(self.tasks)
    active = jnp.asarray(order)[phase]
    mask = jax.nn.one_hot(active, len(self.tasks))
    shared = self._shared(params)
    starting = current % self.phase_steps == 0
    snapshot = jax.tree.map(lambda new, old: jnp.where(starting, jax.lax.stop_gradient(new), old),
                            shared, state["snapshot"])
    penalty = self.successive_weight * sum(
        jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(snapshot)))
    return mask, penalty, {"step": current + 1, "snapshot": snapshot}

  def _combine(self, losses, params, model_state, rng, grad_norms=None, step=None):
    """Total loss of the loss weighting (masked by the phase), new non-arch state, metrics."""
    mask, successive, phase_state = self._phase(model_state, params, step)
    # RLW draws its weights once per optimizer step: every micro-batch of a step uses the same draw.
    total, w_state, metrics = self.weighting.total(
        losses * mask, params=params.get("weighting", {}), state=model_state.get("weighting", {}),
        rng=step_rng(step, rng), step=step_or_counter(step, jnp.zeros((), jnp.int32)),
        grad_norms=grad_norms)
    own = {}
    if w_state:
      own["weighting"] = w_state
    if phase_state is not None:
      own["successive"] = phase_state
      metrics = {**metrics, "penalty_successive": successive}
    return total + successive, own, metrics

  def _metrics(self, losses, penalties, extra) -> Metrics:
    # Per-task values by task name (`w_3` from a weighting becomes `w_<task>`).
    names = {f"w_{i}": f"w_{t.name}" for i, t in enumerate(self.tasks)}
    return {**{f"{t.name}/loss": losses[i] for i, t in enumerate(self.tasks)},
            **{f"penalty_{k}": v for k, v in penalties.items()},
            **{names.get(k, k): v for k, v in extra.items()}}

  def loss(self, params, model_state, batch, rng, *, trainable, grad_norms=None, step=None):
    x, targets = self._inputs(batch)
    outputs, penalties, arch_state = self._apply(params, model_state, x, train=True,
                                                 trainable=trainable, rng=rng)
    losses = self._task_losses(outputs, targets)
    total, own, metrics = self._combine(losses, params, model_state, rng, grad_norms, step)
    total = total + sum(penalties.values(), jnp.zeros(()))
    return total, ({**arch_state, **own}, self._metrics(losses, penalties, metrics))

  # --- gradients -------------------------------------------------------------------------------

  def gradients(self, trainable_params, frozen_params, model_state, batch, rng, *, trainable,
                step=None):
    if self.aggregate is None and not self.weighting.needs_grad_norms:
      return super().gradients(trainable_params, frozen_params, model_state, batch, rng,
                               trainable=trainable, step=step)
    if self.grad_space == "representation":
      jac = self._representation_jacobian(trainable_params, frozen_params, model_state, batch, rng,
                                          trainable, step)
      gram = _gram(jax.tree.map(lambda r: r[:-1], jac.rows_z))
    else:
      jac = self._parameter_jacobian(trainable_params, frozen_params, model_state, batch, rng,
                                     trainable, step)
      shared = [g.reshape(g.shape[0], -1) for g in _select(jac.rows_params, shared=True)]
      if not shared:
        raise ConfigError(f"weighting {self.method!r} needs parameters shared by the tasks, and "
                          f"{type(self.model).__name__} has none trainable")
      gram = _gram(jnp.concatenate(shared, axis=1)[:-1])  # the penalty row is not a task
    if self.aggregate is None:  # GradNorm: norms from the Jacobian, then the usual backward pass
      grad_norms = jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)))
      def loss_of_trainable(tp):
        return self.loss(masks.merge(tp, frozen_params), model_state, batch, rng,
                         trainable=trainable, grad_norms=grad_norms, step=step)
      (loss, (new_state, metrics)), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(
          trainable_params)
      return grads, new_state, {"loss": loss, **metrics}
    # PCGrad's random orders: one draw per optimizer step, shared by its micro-batches.
    w, agg_metrics = self.aggregate(gram, jax.random.fold_in(step_rng(step, rng), 7))
    w = jax.lax.stop_gradient(w)
    if self.grad_space == "representation":
      cot_z = jax.tree.map(lambda r: jnp.einsum("t,t...->...", w, r[:-1],
                                                precision=jax.lax.Precision.HIGHEST), jac.rows_z)
      trunk_grads = jac.trunk_vjp((cot_z, jax.tree.map(jnp.ones_like, jac.feature_penalties)))[0]
      # Given z, a head depends only on its own task: summing the rows gives each head its task's
      # plain gradient (and the penalty row its unweighted share).
      head_grads = jax.tree.map(lambda g: g.sum(axis=0), jac.rows_params)
      grads = jax.tree.map(jnp.add, trunk_grads, head_grads)
    else:
      grads = _combine_rows(jac.rows_params, jnp.concatenate([w, jnp.ones((1,))]),
                            jnp.ones((len(self.tasks) + 1,)))
    total = jnp.sum(w * jac.losses) + sum(jac.penalties.values(), jnp.zeros(()))
    metrics = self._metrics(jac.losses, jac.penalties, {f"w_{i}": w[i] for i in range(len(w))})
    return grads, jac.state, {"loss": total, **metrics, **agg_metrics}

  def _own_state(self, model_state, arch_state, phase_state):
    state = dict(arch_state)
    if "weighting" in model_state:
      state["weighting"] = model_state["weighting"]
    if phase_state is not None:
      state["successive"] = phase_state
    return state

  def _parameter_jacobian(self, tp, fp, model_state, batch, rng, trainable, step=None
                          ) -> "_Jacobian":
    """Per-task gradients of every trainable parameter (rows: tasks, then the penalty sum)."""
    x, targets = self._inputs(batch)

    def rows(tp):
      params = masks.merge(tp, fp)
      outputs, penalties, arch_state = self._apply(params, model_state, x, train=True,
                                                   trainable=trainable, rng=rng)
      mask, successive, phase_state = self._phase(model_state, params, step)
      losses = self._task_losses(outputs, targets) * mask
      if phase_state is not None:
        penalties = {**penalties, "successive": successive}
      penalty = sum(penalties.values(), jnp.zeros(()))
      return jnp.concatenate([losses, penalty[None]]), (
          losses, penalties, self._own_state(model_state, arch_state, phase_state))
    rows_params, (losses, penalties, state) = jax.jacrev(rows, has_aux=True)(tp)
    return _Jacobian(None, rows_params, losses, penalties, state, None, None)

  def _representation_jacobian(self, tp, fp, model_state, batch, rng, trainable, step=None
                               ) -> "_Jacobian":
    """One forward to z; per-task gradients w.r.t. z and the heads from T VJPs through the heads."""
    x, targets = self._inputs(batch)

    def features(tp):
      z, pen_f, state = self._apply(masks.merge(tp, fp), model_state, x, train=True,
                                    trainable=trainable, rng=rng, method="features")
      return (z, pen_f), state
    (z, pen_f), trunk_vjp, feature_state = jax.vjp(features, tp, has_aux=True)

    def heads(z, tp):
      params = masks.merge(tp, fp)
      outputs, pen_h, arch_state = self._apply(params, {**model_state, **feature_state}, z,
                                               train=True, trainable=trainable, rng=rng,
                                               method="heads")
      mask, successive, phase_state = self._phase(model_state, params, step)
      losses = self._task_losses(outputs, targets) * mask
      if phase_state is not None:
        pen_h = {**pen_h, "successive": successive}
      penalty = sum(pen_h.values(), jnp.zeros(()))
      return jnp.concatenate([losses, penalty[None]]), (
          losses, pen_h, self._own_state(model_state, arch_state, phase_state))
    vector, heads_vjp, (losses, pen_h, state) = jax.vjp(heads, z, tp, has_aux=True)
    rows_z, rows_params = jax.vmap(heads_vjp)(jnp.eye(vector.shape[0]))
    return _Jacobian(rows_z, rows_params, losses, {**pen_f, **pen_h}, state, trunk_vjp, pen_f)

  # --- evaluation ------------------------------------------------------------------------------

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    x, targets = self._inputs(batch)
    outputs, _, _ = self._apply(params, model_state, x, train=False)
    out = {}
    for t in self.tasks:
      if t.name not in targets:
        continue
      y, rows = targets[t.name]
      o = outputs[t.name][rows]
      out[f"{t.name}/loss"] = likelihood.task_error(t.kind, o, y, t.label_noise)
      out.update({f"{t.name}/{k}": v for k, v in likelihood.task_metrics(t.kind, o, y).items()})
    return out


class _Jacobian(NamedTuple):
  """Per-task gradient rows (tasks, then the penalty sum) and what the forward pass gave."""
  rows_z: PyTree | None  # z's structure, every leaf [T + 1, ...] (representation space)
  rows_params: PyTree  # every trainable leaf with a leading T + 1 axis
  losses: jax.Array  # [T]
  penalties: dict[str, jax.Array]
  state: PyTree  # the new model_state
  trunk_vjp: Any  # representation space: cotangent (dz, dpenalties) -> trunk gradients
  feature_penalties: dict[str, jax.Array] | None


def _gram(rows: PyTree) -> jax.Array:
  """G = J J^T for per-task gradient rows (every leaf with a leading task axis)."""
  flat = jnp.concatenate([r.reshape(r.shape[0], -1).astype(jnp.float32)
                          for r in jax.tree.leaves(rows)], axis=1)
  return jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)


def _select(tree: PyTree, shared: bool) -> list[jax.Array]:
  """Leaves of a params-shaped tree that are shared (or task-specific) by top-level key."""
  return [leaf for key, sub in tree.items() if (key not in TASK_SPECIFIC) == shared
          for leaf in jax.tree.leaves(sub)]


def _combine_rows(jac: PyTree, shared_weights: jax.Array, specific_weights: jax.Array) -> PyTree:
  """sum over rows of the Jacobian, weighted by `shared_weights` on shared leaves and by
  `specific_weights` on task-specific ones."""
  def combine(weights):
    return lambda g: jnp.einsum("t,t...->...", weights, g, precision=jax.lax.Precision.HIGHEST)
  return {key: jax.tree.map(combine(specific_weights if key in TASK_SPECIFIC else shared_weights), sub)
          for key, sub in jac.items()}
