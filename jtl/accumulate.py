"""Gradient accumulation, defined once for every objective.

`gradients(objective, ..., accum=k)` splits the batch into k micro-batches (rows i, i + k, i + 2k, ...:
each stays spread over every device), calls `objective.gradients` on each inside a `lax.scan` (so
activation memory is that of one micro-batch) and returns the mean gradient, the merged model state
and the mean metrics. The contract every objective relies on (jtl/objectives/base.py, "One optimizer
step"): every call starts from the step's `model_state` and gets the same `Step` (optimizer step and
step key) but its own `micro_index` and `rng`; floating state leaves become `old + mean_i(new_i - old)`
and integer/bool leaves the last call's value. k = 1 is exactly one call of `objective.gradients`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jtl.objectives.base import Metrics, Objective, PyTree, Step, takes_step


def micro_batches(batch: PyTree, accum: int) -> PyTree:
  """Every leaf [B, ...] as [k, B / k, ...], micro-batch i holding rows i, i + k, i + 2k, ..."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                      batch)


def micro_rng(rng: jax.Array, index: Any, accum: int) -> jax.Array:
  """The key of micro-batch `index`: the step's key itself without accumulation."""
  return rng if accum == 1 else jax.random.fold_in(rng, index)


def _is_float(x: jax.Array) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def merge_states(old: PyTree, new_states: list[PyTree]) -> PyTree:
  """The step's model_state from the states k calls returned, all started from `old`: floating leaves
  `old + mean_i(new_i - old)` (exactly `old` where no call changed it), the others the last call's.
  The reference form of what `gradients` computes inside its scan."""
  k = len(new_states)
  def merge(o, *news):
    if not _is_float(o):
      return news[-1]
    return o + sum(n - o for n in news) / k
  return jax.tree.map(merge, old, *new_states)


def scan_micro_batches(call: Callable[[Any, jax.Array], tuple[PyTree, PyTree, Metrics]],
                       trainable_params: PyTree, model_state: PyTree, xs: Any, accum: int
                       ) -> tuple[PyTree, PyTree, Metrics]:
  """Runs `call(x_i, i) -> (grads, new_state, metrics)` for the k micro-batch inputs `xs` (leading axis
  k) in a `lax.scan`, every call from the same `model_state`; returns (mean grads, merged state, mean
  metrics) with the state rule of this module. `call` should trace the loop body's copy of the
  objective (`Objective.in_loop_body`: on CPU every convolution a matmul, as XLA:CPU runs
  convolutions inside a loop many times slower)."""
  def one(carry, inputs):
    grads_sum, state_acc = carry
    x, index = inputs
    grads, new_state, metrics = call(x, index)
    # Floating leaves: the running sum of the calls' changes; the others: the latest value.
    state_acc = jax.tree.map(lambda acc, o, n: acc + (n - o) if _is_float(o) else n,
                             state_acc, model_state, new_state)
    return (jax.tree.map(jnp.add, grads_sum, grads), state_acc), metrics

  zeros = jax.tree.map(jnp.zeros_like, trainable_params)
  state_zero = jax.tree.map(lambda o: jnp.zeros_like(o) if _is_float(o) else o, model_state)
  (grads, state_acc), metrics = jax.lax.scan(one, (zeros, state_zero),
                                             (xs, jnp.arange(accum, dtype=jnp.int32)))
  new_state = jax.tree.map(lambda o, acc: o + acc / accum if _is_float(o) else acc,
                           model_state, state_acc)
  return (jax.tree.map(lambda g: g / accum, grads), new_state,
          jax.tree.map(lambda m: m.mean(axis=0), metrics))


def gradients(objective: Objective, trainable_params: PyTree, frozen_params: PyTree,
              model_state: PyTree, batch: PyTree, rng: jax.Array, *, trainable: PyTree,
              step: jax.Array, accum: int = 1) -> tuple[PyTree, PyTree, Metrics]:
  """(mean gradient, merged model_state, mean metrics) of optimizer step `step` over `accum`
  micro-batches of `batch`; `rng` is the step's key. An objective whose loss is not a mean over
  micro-batches may do the whole accumulated step itself (`Objective.accumulated_gradients`, e.g.
  contrastive gradient caching)."""
  with_step = takes_step(objective.gradients)
  if accum == 1:
    extra = {"step": Step.single(step, rng)} if with_step else {}
    return objective.gradients(trainable_params, frozen_params, model_state, batch, rng,
                               trainable=trainable, **extra)
  step = jnp.asarray(step, jnp.int32)
  own = objective.accumulated_gradients(trainable_params, frozen_params, model_state, batch, rng,
                                        trainable=trainable, step=step, accum=accum)
  if own is not None:
    return own

  body = objective.in_loop_body()  # (its models traced inside the scan: cpu_ops.FastPaths)

  def call(micro_batch, index):
    extra = {"step": Step(step, rng, index, accum)} if with_step else {}
    return body.gradients(trainable_params, frozen_params, model_state, micro_batch,
                               micro_rng(rng, index, accum), trainable=trainable, **extra)
  return scan_micro_batches(call, trainable_params, model_state, micro_batches(batch, accum), accum)
