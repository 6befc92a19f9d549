"""The objective interface: everything paradigm-specific, nothing about devices, checkpoints or logs.

The trainer (`jtl.train`) holds `TrainState(step, params, model_state, opt_state)` and, each step, calls

    grads, model_state, metrics = objective.gradients(trainable_params, frozen_params, model_state,
                                                      batch, rng, trainable=mask, step=step)

then applies the optimizer to the trainable subtree. `step` is a `Step`: the optimizer step, the
step's PRNG key and which micro-batch this call sees (see "One optimizer step" below). Evaluation
calls `objective.eval_metrics`. How the
paradigms still to come map onto this, with no change to the trainer:

* **Several models** (teacher + student, image + text tower, one tower per task): the objective owns
  several linen modules and `init` returns `params = {'student': ..., 'teacher': ...}`. Mask paths then
  read `params/teacher/...`, so "freeze the teacher" is the rule `('params/teacher/.*', False)`; a
  frozen teacher costs no backward pass and no optimizer state like any frozen leaf. Weights from
  another run (the teacher's checkpoint) are declared by `loaded_weights` and loaded by the trainer
  through the same transfer-init seam as `init_from`: an objective never reads storage.
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

One optimizer step is one step for every objective (gradient accumulation, `jtl.accumulate`). With
`grad_accum_steps = k` the trainer splits the batch into k micro-batches (rows i, i + k, ...) and calls
`gradients` once per micro-batch, every call with the SAME starting `model_state`, the same
`step.step` and `step.rng`, its own `rng` (`fold_in(rng, i)`) and `step.micro_index = i`. Then:
* gradients and metrics are the mean over the micro-batches;
* the new `model_state`: a floating leaf is `old + mean_i(new_i - old)` (the mean of the k states
  the calls returned), an integer or bool leaf is the last call's value (they all agree, because every
  call starts from the same state and step). With k = 1 this is exactly the call's own result.
What that means for each kind of state (tests/test_accumulation.py asserts each, for every objective
and every weighting and aggregator):
* **Counters and schedules** (DANN's lambda, the multitask successive-training phase, the
  `started` flags and window counters of DWA/GradNorm/FAMO) advance once per optimizer step: they are
  functions of `step.step` or of the starting state, never counted per call. DANN's lambda and the
  successive phase read `step.step` (the trainer's, checkpointed, so resume is exact); their
  `model_state` counters hold `step.step + 1` for inspection. Called without a `step` (a direct call
  in a test or a notebook) they fall back to their own counters.
  An objective whose `loss`/`gradients` does not take `step` (written before it existed) is
  called without it; the same-starting-state rule still keeps its counters at one per step.
* **Randomness drawn once per step** (RLW's task weights, PCGrad's projection orders) comes from
  `step.rng`, so every micro-batch of a step uses the same draw; per-example randomness (augmented
  views, dropout, CLIP caption templates) uses the call's `rng`.
* **Loss-history weightings** (DWA's window sums, FAMO's previous losses, GradNorm's initial
  losses): their state is updated from each micro-batch's mean losses and averaged, so a state that
  is linear in the losses (DWA's sums and means, the losses FAMO and GradNorm remember) sees the
  step's mean losses exactly. The weights applied come from the step's starting state (equal,
  static, uncertainty, DWA, RLW, GradNorm): the accumulated gradient equals the full batch's.
  FAMO's weights divide by the micro-batch's own losses, and GradNorm's weight update uses the
  micro-batch's gradient norms: for these the result is the mean of the k per-micro-batch results.
* **Gradient aggregators** (PCGrad, MGDA, CAGrad, IMTL, Nash-MTL, UPGrad): the aggregator runs on each
  micro-batch's per-task gradients and the k combined gradients are averaged (mean of aggregates,
  not the aggregate of the mean gradients; the two agree for k = 1 only).
* **BatchNorm statistics**: each micro-batch is normalised by its own statistics (as a device is
  under per-device BatchNorm), and the running averages take one EMA update per optimizer step with
  the mean of the micro-batch statistics (the mean of the k updated averages): the running mean equals
  the full batch's update, the running variance misses the between-micro-batch variance.
* **Contrastive losses with gradient caching** (SimCLR, SupCon, CLIP, SigLIP:
  `accumulated_gradients`): the loss of the whole batch with every negative, at the activation memory
  of one micro-batch; without BatchNorm or dropout the gradient equals one step on the whole batch
  (jtl/objectives/contrastive.py, clip.py).
* **Other batch-level losses** (CORAL/MMD statistics; ProtoNet/MAML are unaffected, episodes are
  whole): each micro-batch's loss sees that micro-batch only; the gradient is the mean of the k
  micro-batch gradients.
* **Linear objectives** (a mean over examples with no BatchNorm: supervised, distillation, DANN, and
  the multitask weightings above whose weights come from the starting state): the accumulated update
  equals one step on the whole batch to float rounding.

Metrics returned from a step are scalars, averaged over the logging window by the trainer. Metrics from
`eval_metrics` are per-example arrays `[B]`; the evaluator averages them over real (unpadded) examples.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import inspect
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl import masks
from jtl.models import cpu_ops, layers

PyTree = Any
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class Step:
  """What an objective knows of the optimizer step a call belongs to.

  `step`: the optimizer step (int32, the trainer's `TrainState.step`, the same for every micro-batch);
  `rng`: the step's PRNG key, the same for every micro-batch (draw once-per-step randomness from
  it); `micro_index`: which micro-batch this call sees (int32, 0 without accumulation);
  `micro_count`: how many micro-batches the step has (static).
  """
  step: jax.Array
  rng: jax.Array
  micro_index: jax.Array
  micro_count: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def single(cls, step: Any, rng: jax.Array) -> "Step":
    """The step of an un-accumulated call (one micro-batch, the whole batch)."""
    return cls(jnp.asarray(step, jnp.int32), rng, jnp.zeros((), jnp.int32), 1)


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
  """Weights an objective needs from another run's checkpoint (a distillation teacher). The objective
  only declares them (`Objective.loaded_weights`); the trainer's transfer-init seam, the one
  `init_from` goes through, reads them and puts them in the step-0 state, so no objective touches
  storage, and a resumed run reads them from its own checkpoints.

  Attributes:
    key: the entry of `params` and of `model_state` they fill, every leaf of it; below it, paths
      are the source run's own (`params/teacher/backbone/...` <- `params/backbone/...`).
    workdir: the source run's workdir. step: its checkpoint step (None: the latest).
    role: what they are, for messages ("teacher").
    workdir_option, step_option: the config keys that set `workdir` and `step` (for messages).
    fix: what to change when the checkpoint does not fit `key`'s shapes (for messages).
  """
  key: str
  workdir: str
  step: int | None
  role: str
  workdir_option: str
  step_option: str
  fix: str


def step_or_counter(step: Step | None, counter: jax.Array) -> jax.Array:
  """The optimizer step if the trainer gave one, else the objective's own counter (direct calls)."""
  return counter if step is None else step.step


def takes_step(method: Any) -> bool:
  """Whether an objective's `loss` or `gradients` accepts `step=` (objectives written before `Step`
  existed are still called, without it)."""
  try:
    parameters = inspect.signature(method).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == "step" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def step_rng(step: Step | None, rng: jax.Array) -> jax.Array:
  """The step's key for once-per-step draws; the call's `rng` when called without a `Step`."""
  return rng if step is None else step.rng


class Objective(abc.ABC):
  """Base class. Subclasses implement `init`, `loss` and `eval_metrics`; may override `gradients`."""

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    """Returns `(params, model_state)` for an example (host-local or abstract) batch."""

  @abc.abstractmethod
  def loss(self, params: PyTree, model_state: PyTree, batch: PyTree, rng: jax.Array, *,
           trainable: PyTree, step: Step | None = None) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Training loss: `(loss, (new_model_state, metrics))`; `trainable` is the static bool mask,
    `step` the optimizer step of the call (None outside the trainer)."""

  @abc.abstractmethod
  def eval_metrics(self, params: PyTree, model_state: PyTree, batch: PyTree) -> Metrics:
    """Per-example metrics `{name: [B]}` in inference mode."""

  def gradients(self, trainable_params: PyTree, frozen_params: PyTree, model_state: PyTree,
                batch: PyTree, rng: jax.Array, *, trainable: PyTree, step: Step | None = None
                ) -> tuple[PyTree, PyTree, Metrics]:
    """Gradients w.r.t. the trainable subtree only, so no backward pass runs through frozen weights."""
    extra = {"step": step} if takes_step(self.loss) else {}
    def loss_of_trainable(tp):
      return self.loss(masks.merge(tp, frozen_params), model_state, batch, rng, trainable=trainable,
                       **extra)
    (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(
        trainable_params)
    return grads, model_state, {"loss": loss, **metrics}

  def loaded_weights(self) -> tuple[LoadedWeights, ...]:
    """Weights from other runs' checkpoints that the step-0 state must hold (default: none). `init`
    returns placeholders of the right structure there; the trainer fills them."""
    return ()

  def in_loop_body(self) -> "Objective":
    """A shallow copy whose models (linen modules held as attributes, or in lists, tuples and dicts
    of them) take the CPU formulations meant for a loop body (`cpu_ops.in_loop_body`: every
    convolution a matmul). `jtl.accumulate` traces this copy inside its `lax.scan`; an objective
    that writes its own loop over a model does the same. Same parameters, same results to float
    rounding; only how XLA computes them differs."""
    body = copy.copy(self)
    for name, value in vars(self).items():
      changed = cpu_ops.in_loop_body(value)
      if changed is not value:
        setattr(body, name, changed)
    return body

  def accumulated_gradients(self, trainable_params: PyTree, frozen_params: PyTree,
                            model_state: PyTree, batch: PyTree, rng: jax.Array, *,
                            trainable: PyTree, step: jax.Array, accum: int
                            ) -> tuple[PyTree, PyTree, Metrics] | None:
    """The whole step under `grad_accum_steps = accum > 1`, for an objective whose loss is not a mean
    over micro-batches (contrastive gradient caching); `rng` is the step's key. None (the default):
    `jtl.accumulate` calls `gradients` once per micro-batch."""
    del trainable_params, frozen_params, model_state, batch, rng, trainable, step, accum
    return None


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
