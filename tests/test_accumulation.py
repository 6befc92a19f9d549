"""One optimizer step is one step for every objective: `grad_accum_steps=k` on a batch B against one
step on B, for every registered objective and every multitask weighting and aggregator.

For each case (tiny MLPs, one step from random parameters at a non-zero step):
* always: the integer state (counters, flags, schedules' steps) equals the one-step state exactly,
  and the accumulated step equals the documented semantics (jtl/objectives/base.py, "One optimizer
  step") computed here by hand: the mean over micro-batches of what one un-accumulated call on that
  micro-batch gives (same starting state, the step's key for once-per-step draws);
* where the objective is linear in the batch: the accumulated gradient (and floating state) equals
  the one-step one to float rounding.
The trainer itself is checked end to end on 8 devices with DANN (the lambda schedule and its counter).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import (adain_digits, clip_digits, coral_digits, dann_digits,
                                 distill_digits, maml_digits, multitask_digits, protonet_digits,
                                 simclr_digits, style_transfer, supcon_digits)
from jtl import accumulate, data, masks, objectives, train
from jtl.losses import domain as domain_losses
from jtl.multitask import aggregators, weighting
from jtl.objectives.base import Step
from jtl.sharding import to_global
from tests.helpers import compile_fast  # noqa: F401  (autouse: this module compiles fast)

K = 2  # micro-batches
STEP = 3  # the optimizer step of the compared step (non-zero: schedules and phases move)
MLP = dict(name="mlp", num_classes=10, hidden=(8,))
ONE_DEVICE = {"mesh.axes": (("data", 1),)}
jit = functools.partial(jax.jit, static_argnames=("accum",))


def _small(config: ml_collections.ConfigDict, batch_size: int, **overrides
           ) -> ml_collections.ConfigDict:
  config.update_from_flattened_dict({"total_steps": 10, "batch_size": batch_size,
                                     "optim.warmup_steps": 1, "grad_accum_steps": K, **ONE_DEVICE})
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return config


@dataclasses.dataclass
class Case:
  build: Callable[[str], ml_collections.ConfigDict]  # (teacher workdir) -> config
  linear_grads: bool  # the accumulated gradient equals the whole batch's
  linear_state: bool  # ... and so does every floating state leaf
  cached: bool = False  # the objective does the accumulated step itself (contrastive gradient caching)


def _multitask(method: str, phase_steps: int = 0, dataset: str = "multidigits", **options
               ) -> Callable[[str], ml_collections.ConfigDict]:
  def build(_):
    c = multitask_digits.get_config(f"weighting={method},model=mlp,data={dataset}")
    c.model.hidden = (8,)
    c.multitask.weighting_options = ml_collections.ConfigDict(options)
    c.multitask.phase_steps = phase_steps
    return _small(c, 16)
  return build


def _contrastive(module, **extra):
  def build(_):
    c = module.get_config()
    c.model = ml_collections.ConfigDict(dict(MLP, num_classes=c.model.get("num_classes", 10)))
    c.contrastive.projection_dims = (8,)
    return _small(c, 16, **extra)
  return build


def _clip(loss):
  def build(_):
    c = clip_digits.get_config(f"loss={loss}")
    c.model = ml_collections.ConfigDict(dict(MLP))
    c.clip.update(dict(embed_dim=8, text_width=8, text_depth=1, text_heads=2,
                       augment_images=False))
    return _small(c, 16)
  return build


def _domain(mode):
  def build(_):
    c = (dann_digits.get_config("mode=dann") if mode == "dann"
         else coral_digits.get_config(f"method={mode}"))
    c.model = ml_collections.ConfigDict(MLP)
    c.domain.hidden = (8,)
    return _small(c, 16)
  return build


def _episodes(module, model):
  def build(_):
    c = module.get_config()
    c.model = ml_collections.ConfigDict(model)
    return _small(c, 4)
  return build


def _supervised(use_bn):
  def build(_):
    c = simclr_digits.get_config()
    c.objective = "supervised"
    c.model = ml_collections.ConfigDict(dict(MLP, use_bn=use_bn))
    return _small(c, 16)
  return build


def _style(_):
  """The image is the parameter and the batch is never read: every micro-batch's gradient is the
  whole step's."""
  return _small(style_transfer.get_config("encoder=random"), 4)


def _adain(_):
  # A fresh, narrow encoder (no run there is read): the case compares the step, not the weights.
  return _small(adain_digits.get_config("encoder=/nonexistent/encoder_run"), 16,
                model__widths=(8, 16), adain__width=8)


def _distill(teacher):
  c = distill_digits.get_config(f"mode=kd,teacher={teacher}")
  c.model = ml_collections.ConfigDict(MLP)
  return _small(c, 16)


CASES = {
    "supervised": Case(_supervised(False), True, True),
    # BatchNorm: each micro-batch normalised by its own statistics; running stats averaged.
    "supervised_batchnorm": Case(_supervised(True), False, False),
    # Gradient caching: every negative of the whole batch, so equal to one step (no BatchNorm here).
    "simclr": Case(_contrastive(simclr_digits), True, True, cached=True),
    "supcon": Case(_contrastive(supcon_digits), True, True, cached=True),
    "clip": Case(_clip("softmax"), True, True, cached=True),
    "siglip": Case(_clip("sigmoid"), True, True, cached=True),
    "distill": Case(_distill, True, True),
    "dann": Case(_domain("dann"), True, True),
    "coral": Case(_domain("coral"), False, True),
    "mmd": Case(_domain("mmd"), False, True),
    "protonet": Case(_episodes(protonet_digits, dict(MLP, num_classes=0)), True, True),
    "maml": Case(_episodes(maml_digits, dict(MLP, num_classes=5)), True, True),
    "style": Case(_style, True, True),
    "adain": Case(_adain, True, True),
    # Loss weightings whose weights come from the step's starting state (or its key): linear.
    "mt_equal": Case(_multitask("equal"), True, True),
    "mt_static": Case(_multitask("static"), True, True),
    "mt_uncertainty": Case(_multitask("uncertainty"), True, True),
    "mt_dwa": Case(_multitask("dwa", window=1), True, True),  # a window per step: state moves
    "mt_rlw": Case(_multitask("rlw"), True, True),
    "mt_gradnorm": Case(_multitask("gradnorm"), True, False),  # weight update: mean of per-micro
    "mt_famo": Case(_multitask("famo"), False, False),  # weights divide by the micro-batch's losses
    # Hashimoto et al.'s successive training: the phase and its counter follow the optimizer step.
    "mt_successive": Case(_multitask("equal", phase_steps=2), True, True),
    **{f"mt_{name}": Case(_multitask(name), False, True) for name in aggregators.AGGREGATORS},
    # Three tasks: PCGrad's random projection order matters (with two there is only one order).
    "mt_pcgrad": Case(_multitask("pcgrad", dataset="attributes"), False, True),
}


def test_every_objective_weighting_and_aggregator_has_a_case():
  names = {"multitask" if n.startswith("mt_") else n for n in CASES}
  assert set(objectives.OBJECTIVES) <= names, set(objectives.OBJECTIVES) - names
  assert {f"mt_{n}" for n in (*weighting.WEIGHTINGS, *aggregators.AGGREGATORS)} <= set(CASES)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A two-step supervised teacher checkpoint for the distillation case."""
  workdir = tmp_path_factory.mktemp("teacher")
  config = distill_digits.get_config("mode=teacher")
  config.model = ml_collections.ConfigDict(dict(MLP, use_bn=True))
  config.update_from_flattened_dict({"total_steps": 2, "batch_size": 16, "log_every": 2,
                                     "checkpoint_every": 2, "optim.warmup_steps": 1, **ONE_DEVICE})
  train.train(config, str(workdir))
  return workdir


_BATCHES = {}


def _example_batch(config):
  """One training batch, built once per data config (the multitask cases share theirs)."""
  key = (config.data.to_json_best_effort(), config.batch_size)
  if key not in _BATCHES:
    _BATCHES[key] = next(data.train_iterator(config.data, global_batch_size=config.batch_size,
                                             seed=1))
  return _BATCHES[key]


def _noisy(tree, seed):
  """Every floating leaf plus noise: zero-initialised heads would leave most gradients zero."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x
                            for x, k in zip(leaves, keys)])


def _micro(batch, i):
  """Micro-batch i as jtl.accumulate splits it (rows i, i + K, ...), written independently."""
  return jax.tree.map(lambda x: x[i::K], batch)


def _reference(call, batch, rng):
  """The documented semantics by hand: K separate un-accumulated calls on the micro-batches, all from
  the same state, with the step's key in `Step.rng`, then averaged."""
  results = [call(_micro(batch, i), jax.random.fold_in(rng, i), i) for i in range(K)]
  grads = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *[r[0] for r in results])
  metrics = jax.tree.map(lambda *m: np.mean(np.stack(m), axis=0), *[r[2] for r in results])

  def state_leaf(*news):
    if jnp.issubdtype(news[0].dtype, jnp.inexact):
      return np.mean(np.stack(news), axis=0)
    for n in news[1:]:  # counters must not depend on the micro-batch
      np.testing.assert_array_equal(n, news[0])
    return np.asarray(news[0])
  state = jax.tree.map(state_leaf, *[r[1] for r in results])
  return grads, state, metrics


def _assert_trees_close(actual, expected, what, rtol=1e-3):
  """Leaf by leaf within rtol, and absolutely within rtol x the largest magnitude in the tree (float32
  rounding of sums in another order; CLIP's logit scale 1/0.07 magnifies it)."""
  pa, ta = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))
  pe, te = jax.tree_util.tree_flatten_with_path(jax.device_get(expected))
  assert ta == te, what
  scale = max([float(np.max(np.abs(e))) for _, e in pe if np.size(e)] + [1e-3])
  for (path, a), (_, e) in zip(pa, pe):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol,
                               atol=rtol * scale, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _int_leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
          if not jnp.issubdtype(x.dtype, jnp.inexact)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_accumulated_step_is_one_optimizer_step(name, request):
  case = CASES[name]
  config = case.build(request.getfixturevalue("teacher_dir") if name == "distill" else None)
  batch = _example_batch(config)
  s = train.setup(config, batch)
  params, model_state = train.fresh_variables(s)
  trainable_mask = s.trainable
  params = _noisy(params, 0)
  if name == "distill":  # the teacher stays as loaded
    params = {**params, "teacher": train.fresh_variables(s)[0]["teacher"]}
  tp, fp = masks.partition(params, trainable_mask)
  batch = jax.device_put(batch)
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), STEP)

  run = jit(lambda tp, ms, b, accum: accumulate.gradients(
      s.objective, tp, fp, ms, b, rng, trainable=trainable_mask, step=jnp.int32(STEP),
      accum=accum))
  full = run(tp, model_state, batch, accum=1)
  accumulated = run(tp, model_state, batch, accum=K)
  call = jax.jit(lambda micro, key, index: s.objective.gradients(
      tp, fp, model_state, micro, key, trainable=trainable_mask,
      step=Step(jnp.int32(STEP), rng, jnp.int32(index), K)))
  expected = None if case.cached else _reference(call, batch, rng)
  if name.startswith("mt_"):
    # Multitask randomness (RLW's weights, PCGrad's orders) is drawn once per optimizer step, from
    # Step.rng: the call's own key (here another one) changes nothing.
    _assert_trees_close(call(_micro(batch, 0), jax.random.key(99), 0)[0],
                        call(_micro(batch, 0), jax.random.fold_in(rng, 0), 0)[0],
                        "gradient with another call key", rtol=1e-6)

  # The documented semantics, for every case that accumulates per micro-batch.
  if expected is not None:
    _assert_trees_close(accumulated[0], expected[0], "gradient vs mean of micro-batch gradients")
    _assert_trees_close(accumulated[1], expected[1], "state vs mean of micro-batch states")
    _assert_trees_close(accumulated[2], expected[2], "metrics vs mean of micro-batch metrics")
  else:
    _assert_trees_close(accumulated[2], full[2], "metrics vs the whole batch's")
  # Counters, flags and schedule steps: one step, whatever K.
  counters, counters_full = _int_leaves(accumulated[1]), _int_leaves(full[1])
  assert counters.keys() == counters_full.keys()
  for key in counters:
    np.testing.assert_array_equal(counters[key], counters_full[key], err_msg=key)
  # Step counters (DANN's domain/step, the successive phase's) hold the optimizer step + 1, even
  # though the starting state holds 0.
  step_counters = [k for k in counters if k.endswith("['step']")]
  assert bool(step_counters) == (name in ("dann", "mt_successive")), step_counters
  for key in step_counters:
    assert int(counters[key]) == STEP + 1, key
  if name == "dann":  # the schedule at the optimizer step, not at the state's (fresh) counter
    expected_lambda = domain_losses.dann_lambda(STEP / config.total_steps, 10.0)
    np.testing.assert_allclose(full[2]["lambda"], expected_lambda, rtol=1e-6)
    np.testing.assert_allclose(accumulated[2]["lambda"], expected_lambda, rtol=1e-6)
    assert int(accumulated[1]["domain"]["step"]) == STEP + 1
  if case.linear_grads:
    _assert_trees_close(accumulated[0], full[0], "accumulated vs whole-batch gradient")
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(full[0])) > 1e-4  # not vacuous
  if case.linear_state:
    _assert_trees_close(accumulated[1], full[1], "accumulated vs whole-batch state")
  if name == "supervised_batchnorm":
    # Running means: the mean of the micro-batch means is the batch mean, so they match one step;
    # running variances miss the between-micro-batch variance, so they do not.
    stats, stats_full = accumulated[1]["batch_stats"], full[1]["batch_stats"]
    means = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(stats)[0] if "mean" in str(p)]
    means_full = [x for p, x in jax.tree_util.tree_flatten_with_path(stats_full)[0]
                  if "mean" in str(p)]
    assert means
    for (_, a), b in zip(means, means_full):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    var = [x for p, x in jax.tree_util.tree_flatten_with_path(stats)[0] if "var" in str(p)]
    var_full = [x for p, x in jax.tree_util.tree_flatten_with_path(stats_full)[0] if "var" in str(p)]
    assert not np.allclose(var[0], var_full[0], rtol=1e-6, atol=0)


def test_dann_schedule_advances_once_per_optimizer_step_in_the_trainer():
  """The trainer on 8 devices: 4 steps with grad_accum_steps=2 and with 1 on the same batches give
  the same lambda per step (0, 1, 2, 3 / total_steps) and domain/step = 4, and (DANN being linear in
  the batch without BatchNorm) the same parameters."""
  results = {}
  for k in (1, 2):
    config = dann_digits.get_config("mode=dann")
    config.model = ml_collections.ConfigDict(MLP)
    config.domain.hidden = (8,)
    config.update_from_flattened_dict({"total_steps": 8, "batch_size": 32, "grad_accum_steps": k,
                                       "optim.warmup_steps": 1})
    batches = list(itertools.islice(
        data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0), 4))
    s = train.setup(config, batches[0])
    params, model_state = train.fresh_variables(s)
    state = train.initial_state(s, _noisy(params, 1), model_state)
    step = train.make_train_step(s)
    lambdas = []
    for b in batches:
      state, metrics = step(state, to_global(b, s.batch_sharding))
      lambdas.append(float(metrics["lambda"]))
    results[k] = (lambdas, jax.device_get(state))
  expected = 2 / (1 + np.exp(-10 * np.arange(4) / 8)) - 1
  for k, (lambdas, state) in results.items():
    np.testing.assert_allclose(lambdas, expected, rtol=1e-5, err_msg=f"k={k}")
    assert int(state.model_state["domain"]["step"]) == 4, k
  _assert_trees_close(results[2][1].params, results[1][1].params, "params after 4 steps",
                      rtol=1e-4)


@pytest.mark.parametrize("module", [simclr_digits, supcon_digits], ids=["simclr", "supcon"])
def test_contrastive_gradient_caching_equals_the_whole_batch_on_8_devices(module):
  """One SGD step (lr 1, so the update is minus the gradient) through the trainer on 8 devices:
  grad_accum_steps=4 with gradient caching against one step on the whole batch of 32: the same
  update and loss to float rounding. Without the cache each micro-batch of 8 images would see 7
  negatives instead of 31."""
  updates, losses = {}, {}
  for k in (1, 4):
    config = module.get_config()
    config.model = ml_collections.ConfigDict(dict(MLP,
                                                  num_classes=config.model.get("num_classes", 10)))
    config.contrastive.projection_dims = (8,)
    config.update_from_flattened_dict({"total_steps": 10, "batch_size": 32, "grad_accum_steps": k,
                                       "optim.name": "sgd", "optim.lr": 1.0,
                                       "optim.schedule": "constant", "optim.warmup_steps": 0,
                                       "optim.weight_decay": 0.0})
    batch = _example_batch(config)
    s = train.setup(config, batch)
    assert s.mesh.size == 8
    params, model_state = train.fresh_variables(s)
    state = train.initial_state(s, _noisy(params, 2), model_state)
    before = jax.device_get(state.params)
    state, metrics = train.make_train_step(s)(state, to_global(batch, s.batch_sharding))
    updates[k] = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), before)
    losses[k] = float(metrics["contrastive_loss"])
  _assert_trees_close(updates[4], updates[1], "update with gradient caching vs whole batch")
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"], ids=["clip", "siglip"])
def test_clip_gradient_caching_equals_the_whole_batch_on_8_devices(loss):
  """As for SimCLR: grad_accum_steps=4 on 32 image/caption pairs through the trainer on 8 devices
  gives one SGD step's update on the whole batch (both towers and the loss's scalars)."""
  updates, losses = {}, {}
  for k in (1, 4):
    config = _clip(loss)(None)
    config.update_from_flattened_dict({"mesh.axes": (("data", 8),), "batch_size": 32,
                                       "grad_accum_steps": k, "optim.name": "sgd", "optim.lr": 1.0,
                                       "optim.schedule": "constant", "optim.warmup_steps": 0,
                                       "optim.weight_decay": 0.0})
    batch = _example_batch(config)
    s = train.setup(config, batch)
    assert s.mesh.size == 8
    params, model_state = train.fresh_variables(s)
    state = train.initial_state(s, _noisy(params, 3), model_state)
    before = jax.device_get(state.params)
    state, metrics = train.make_train_step(s)(state, to_global(batch, s.batch_sharding))
    updates[k] = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), before)
    losses[k] = float(metrics["loss"])
  _assert_trees_close(updates[4], updates[1], "update with gradient caching vs whole batch")
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
