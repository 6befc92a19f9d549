"""The objective interface: everything paradigm-specific, nothing about devices, checkpoints or logs.

The trainer (`jtl.train`) holds `TrainState(step, params, model_state, opt_state)` and, each step, calls

    grads, model_state, metrics = objective.gradients(trainable_params, frozen_params, model_state,
                                                      batch, rng, trainable=mask)

then applies the optimizer to the trainable subtree. Evaluation calls `objective.eval_metrics`. How the
paradigms still to come map onto this, with no change to the trainer:

* **Several models** (teacher + student, image + text tower, one tower per task): the objective owns
  several linen modules and `init` returns `params = {'student': ..., 'teacher': ...}`. Mask paths then
  read `params/teacher/...`, so "freeze the teacher" is the rule `('params/teacher/.*', False)`; a
  frozen teacher costs no backward pass and no optimizer state like any frozen leaf.
* **Extra learnable parameters outside a model** (per-task log-variances, a contrastive temperature,
  a CLIP logit scale): more entries in `params`, e.g. `params['log_temperature']`. They are ordinary
  leaves: maskable, optimised, checkpointed, given their own learning rate by `optim.lr_mults`.
* **Extra non-trained state between steps** (BatchNorm statistics, a loss history for dynamic task
  weighting, an EMA teacher, a queue of negatives): `model_state`, any pytree of arrays. `init` creates
  it, `loss`/`gradients` return its new value, the trainer carries, shards and checkpoints it.
* **Several batches per step** (source + target domain, a mixture of tasks): the batch is any pytree
  of arrays with a leading batch dimension, e.g. `{'source': {...}, 'target': {...}}`; the trainer
  shards every leaf along the batch axis and never looks inside.
* **Custom gradient handling** (PCGrad/GradNorm/gradient surgery, per-task gradients combined before
  the update): override `gradients`. The default differentiates `loss` with respect to the trainable
  subtree only; an override may take several `jax.grad`s or a `jax.jacrev` over per-task losses and
  combine them, returning one gradient tree shaped like `trainable_params`.

Metrics returned from a step are scalars, averaged over the logging window by the trainer. Metrics from
`eval_metrics` are per-example arrays `[B]`; the evaluator averages them over real (unpadded) examples.
"""
from __future__ import annotations

import abc
from typing import Any

import flax.linen as nn
import jax

from jtl import masks
from jtl.models import layers

PyTree = Any
Metrics = dict[str, jax.Array]


class Objective(abc.ABC):
  """Base class. Subclasses implement `init`, `loss` and `eval_metrics`; may override `gradients`."""

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    """Returns `(params, model_state)` for an example (host-local or abstract) batch."""

  @abc.abstractmethod
  def loss(self, params: PyTree, model_state: PyTree, batch: PyTree, rng: jax.Array, *,
           trainable: PyTree) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Training loss: `(loss, (new_model_state, metrics))`; `trainable` is the static bool mask."""

  @abc.abstractmethod
  def eval_metrics(self, params: PyTree, model_state: PyTree, batch: PyTree) -> Metrics:
    """Per-example metrics `{name: [B]}` in inference mode."""

  def gradients(self, trainable_params: PyTree, frozen_params: PyTree, model_state: PyTree,
                batch: PyTree, rng: jax.Array, *, trainable: PyTree
                ) -> tuple[PyTree, PyTree, Metrics]:
    """Gradients w.r.t. the trainable subtree only, so no backward pass runs through frozen weights."""
    def loss_of_trainable(tp):
      return self.loss(masks.merge(tp, frozen_params), model_state, batch, rng, trainable=trainable)
    (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(
        trainable_params)
    return grads, model_state, {"loss": loss, **metrics}


def apply_model(model: nn.Module, params: PyTree, model_state: PyTree, x: jax.Array, *,
                train: bool, trainable: PyTree | None = None, rng: jax.Array | None = None,
                method: Any = None) -> tuple[jax.Array, PyTree]:
  """Runs `model`; in training, BatchNorms whose parameters are all frozen use and keep running stats.

  Returns `(output, new_model_state)`. Shared by every objective that trains a linen model.
  """
  frozen = masks.frozen_modules(trainable) if (train and trainable is not None) else frozenset()
  variables = {"params": params, **model_state}
  rngs = {"dropout": rng} if rng is not None else None
  with layers.frozen_norms(frozen):
    if train and model_state:
      out, new_state = model.apply(variables, x, train=True, rngs=rngs, method=method,
                                   mutable=list(model_state))
      return out, {**model_state, **new_state}
    return model.apply(variables, x, train=train, rngs=rngs, method=method), model_state
