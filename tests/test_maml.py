"""MAML (jtl/objectives/maml.py): zero inner steps == plain training on the queries, the
second-order meta-gradient == jax.grad through an unrolled inner loop, FOMAML == MAML minus exactly
the Hessian term (finite differences on a quadratic), ANIL's inner mask, config errors, and
8 devices == 1."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import maml_digits
from jtl import data, models, objectives, train
from jtl.errors import ConfigError
from jtl.objectives import MAML, maml
from jtl.sharding import to_global

WAYS, SHOTS, QUERIES, EPISODES = 3, 2, 3, 2
# Test-only jits at LLVM -O0: numbers, not speed (compiles several times faster on 2 cores).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def tiny():
  """(model, batch, params, model_state): an MLP with BatchNorm, random episodes, random params."""
  model = models.build(dict(name="mlp", num_classes=WAYS, hidden=(5,), use_bn=True))
  rng = np.random.default_rng(0)

  def part(per_class):
    return {"image": rng.normal(size=(EPISODES, WAYS * per_class, 2, 2, 1)).astype(np.float32),
            "label": np.tile(np.repeat(np.arange(WAYS, dtype=np.int32), per_class), (EPISODES, 1))}

  batch = {"support": part(SHOTS), "query": part(QUERIES)}
  variables = jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                  jnp.zeros((1, 2, 2, 1)))
  noise = jit(lambda tree: jax.tree.map(
      lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape), tree))
  params = noise(variables["params"])  # a non-zero head, so every path carries gradient
  return model, batch, params, {"batch_stats": variables["batch_stats"]}


def _ce(model, params, model_state, images, labels):
  """Mean CE in training mode (batch statistics of `images`), written with plain flax + optax."""
  logits, _ = model.apply({"params": params, **model_state}, images, train=True,
                          mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _maml_value_and_grad(objective, params, model_state, batch):
  mask = jax.tree.map(lambda _: True, params)
  fn = functools.partial(objective.loss, model_state=model_state, batch=batch,
                         rng=jax.random.key(3), trainable=mask)
  return jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)


def test_zero_inner_steps_is_plain_training_on_the_query_set(tiny):
  model, batch, params, model_state = tiny
  loss, grads = _maml_value_and_grad(MAML(model, WAYS, inner_steps=0, inner_lr=0.5), params,
                                     model_state, batch)

  def plain(p):  # supervised training on each episode's queries, averaged over episodes
    return sum(_ce(model, p, model_state, batch["query"]["image"][e], batch["query"]["label"][e])
               for e in range(EPISODES)) / EPISODES

  expected_loss, expected_grads = jit(jax.value_and_grad(plain))(params)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_meta_gradient_equals_grad_through_an_unrolled_inner_loop(tiny):
  """Second order (MAML) and first order (FOMAML), each against its own unrolled reference."""
  model, batch, params, model_state = tiny
  steps, lr = 2, 0.5

  def unrolled(p, first_order):
    total = 0.0
    for e in range(EPISODES):
      fast = p
      for _ in range(steps):  # a Python loop: no scan, no masks, no vmap
        g = jax.grad(_ce, argnums=1)(model, fast, model_state, batch["support"]["image"][e],
                                     batch["support"]["label"][e])
        g = jax.lax.stop_gradient(g) if first_order else g
        fast = jax.tree.map(lambda w, gw: w - lr * gw, fast, g)
      total += _ce(model, fast, model_state, batch["query"]["image"][e], batch["query"]["label"][e])
    return total / EPISODES

  reference = jit(jax.value_and_grad(unrolled), static_argnums=1)
  expected = {}
  for first_order in (False, True):
    loss, grads = _maml_value_and_grad(
        MAML(model, WAYS, inner_steps=steps, inner_lr=lr, first_order=first_order), params,
        model_state, batch)
    expected_loss, expected[first_order] = reference(params, first_order)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected[first_order])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # The two orders really differ here, so each comparison above can tell them apart.
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(expected[False]), jax.tree.leaves(expected[True]))) > 1e-3


def test_fomaml_drops_exactly_the_second_order_term_on_a_quadratic():
  """L_S(t) = t'At/2 - b't (Hessian A), L_Q(t) = t'Ct/2 - d't. After K steps of size a, t_K is
  affine in t with Jacobian (I - aA)^K; MAML's gradient is (I - aA)^K grad L_Q(t_K) (checked by
  central differences), FOMAML's is grad L_Q(t_K), and their difference is the Hessian term."""
  rng = np.random.default_rng(0)
  dim, steps, lr = 4, 2, 0.1
  root_a, root_c = rng.normal(size=(2, dim, dim))
  a, c = root_a @ root_a.T + np.eye(dim), root_c @ root_c.T + np.eye(dim)
  b, d, theta = rng.normal(size=(3, dim))

  a32, b32, c32, d32 = (jnp.asarray(x, jnp.float32) for x in (a, b, c, d))

  def inner_and_outer(t, first_order):
    def support_loss(x, step_index):
      del step_index
      return 0.5 * x @ a32 @ x - b32 @ x
    adapted = maml.adapt(support_loss, t, steps=steps, lr=lr, first_order=first_order)
    return 0.5 * adapted @ c32 @ adapted - d32 @ adapted

  second, first = (np.asarray(jax.grad(inner_and_outer)(jnp.asarray(theta, jnp.float32), fo))
                   for fo in (False, True))

  def outer_np(t):  # the same objective in float64 NumPy
    for _ in range(steps):
      t = t - lr * (a @ t - b)
    return 0.5 * t @ c @ t - d @ t, t

  eps = 1e-5
  finite_diff = np.array([(outer_np(theta + eps * e)[0] - outer_np(theta - eps * e)[0]) / (2 * eps)
                          for e in np.eye(dim)])
  adapted = outer_np(theta)[1]
  outer_grad = c @ adapted - d
  jacobian = np.linalg.matrix_power(np.eye(dim) - lr * a, steps)
  np.testing.assert_allclose(jacobian @ outer_grad, finite_diff, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(second, finite_diff, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(first, outer_grad, rtol=1e-4, atol=1e-4)
  second_order_term = (jacobian - np.eye(dim)) @ outer_grad
  assert np.linalg.norm(second_order_term) > 0.1 * np.linalg.norm(outer_grad)
  np.testing.assert_allclose(second - first, second_order_term, rtol=1e-3, atol=1e-4)


def test_anil_adapts_only_the_head_and_still_meta_learns_the_backbone(tiny):
  model, batch, params, model_state = tiny
  objective = MAML(model, WAYS, inner_steps=2, inner_lr=0.5, inner_trainable=maml.ANIL)
  support = jax.tree.map(lambda x: x[0], batch["support"])
  adapted = jit(functools.partial(objective.adapted_params, steps=2, trainable=None))(
      params, model_state, support, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(adapted["backbone"]), jax.tree.leaves(params["backbone"])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(adapted["head"]["kernel"], params["head"]["kernel"])
  _, grads = _maml_value_and_grad(objective, params, model_state, batch)
  assert float(jnp.abs(grads["backbone"]["dense0"]["kernel"]).max()) > 1e-4
  with pytest.raises(ConfigError, match="maml.inner_trainable: .*matches no parameter"):
    MAML(model, WAYS, inner_trainable=(("params/heads/.*", True), (".*", False))).init(
        jax.random.key(0), batch)


def test_steps_at_evaluation_are_eval_inner_steps_unless_given(tiny):
  """`episode_accuracy(..., steps=n)` (the episodic evaluator's `adapt_steps`) and `eval_metrics`
  equal the objective built with `eval_inner_steps=n`, and the number of steps matters."""
  model, batch, params, model_state = tiny
  given = MAML(model, WAYS, inner_lr=0.5, eval_inner_steps=1)
  got = {}
  for n in (0, 1, 3):
    fixed = MAML(model, WAYS, inner_lr=0.5, eval_inner_steps=n)
    got[n] = jit(fixed.eval_metrics)(params, model_state, batch)
    np.testing.assert_array_equal(
        got[n]["loss"],
        jit(functools.partial(given.eval_metrics, steps=n))(params, model_state, batch)["loss"])
    np.testing.assert_array_equal(
        got[n]["accuracy"],
        jit(functools.partial(given.episode_accuracy, steps=n))(params, model_state, batch))
  assert not np.array_equal(got[0]["loss"], got[3]["loss"])
  assert not np.array_equal(got[1]["accuracy"], got[3]["accuracy"])


def _convolutions(jaxpr, in_scan=False, counts=None):
  """{in a scan body?: number of convolutions} over a jaxpr and its sub-jaxprs."""
  counts = {False: 0, True: 0} if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[in_scan] += eqn.primitive.name == "conv_general_dilated"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          _convolutions(getattr(sub, "jaxpr", sub), in_scan or eqn.primitive.name == "scan", counts)
  return counts


def test_adaptation_traces_the_models_loop_body_copy():
  """XLA:CPU runs convolutions inside a loop many times slower (cpu_ops.FastPaths.every_conv; a
  glyph 5-way 5-shot test episode adapted for 3 steps: 3.2 s with XLA's kernels in the scan, 0.4 s
  as matmuls): the inner loop's scan traces the model's loop-body copy, with no convolution left in
  it, while the query pass after it keeps XLA's kernels (8x8 maps)."""
  model = models.build(dict(name="cnn_small", num_classes=WAYS))
  objective = MAML(model, WAYS, inner_steps=2)
  rng = np.random.default_rng(0)
  batch = {part: {"image": rng.normal(size=(1, WAYS * k, 8, 8, 1)).astype(np.float32),
                  "label": np.tile(np.arange(WAYS, dtype=np.int32), (1, k))}
           for part, k in (("support", 2), ("query", 3))}
  params, model_state = objective.init(jax.random.key(0), batch)
  jaxpr = jax.make_jaxpr(objective.episode_accuracy)(params, model_state, batch).jaxpr
  counts = _convolutions(jaxpr)
  assert counts[True] == 0 < counts[False], counts


@pytest.mark.parametrize("overrides, message", [
    (dict(maml__inner_lr=0.0), "maml.inner_lr must be a number in"),
    (dict(maml__inner_steps=-1), "maml.inner_steps must be an integer >= 0"),
    (dict(maml__eval_inner_steps=-2), "maml.eval_inner_steps must be an integer >= 0 or None"),
    (dict(model__num_classes=4), "model.num_classes=4 but data.episodes.ways=5"),
])
def test_bad_maml_config_raises_one_line(overrides, message):
  config = maml_digits.get_config()
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  with pytest.raises(ConfigError, match=message) as e:
    objectives.build(config)
  assert "\n" not in str(e.value)
  config = maml_digits.get_config()
  config.maml.inner_step = 3
  with pytest.raises(ConfigError, match="did you mean 'inner_steps'"):
    objectives.build(config)


def test_eight_device_step_equals_one_device_step():
  assert jax.device_count() == 8
  results = []
  for axes in ((("data", 8),), (("data", 1),)):
    config = maml_digits.get_config("order=2,inner_steps=1,shots=1,queries=2")
    config.mesh.axes = axes
    config.batch_size = 8
    config.model = ml_collections.ConfigDict(dict(name="mlp", num_classes=5, hidden=(16,),
                                                  use_bn=True))
    config.optim.name, config.optim.lr, config.optim.warmup_steps = "sgd", 0.1, 0
    batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    s = train.setup(config, next(batches))
    state = train.initial_state(s, *train.fresh_variables(s))
    step = train.make_train_step(s)
    for batch in itertools.islice(batches, 3):
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    results.append(jax.device_get((state.params, state.model_state, metrics["loss"])))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
