"""The multitask objective: gradients against explicit per-task references, sharding, transfer, CLI."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import cli
from experiments import train as train_entry
from experiments.configs import multitask_digits
from jtl import data, masks, train
from jtl.errors import ConfigError
from jtl.multitask import aggregators
from jtl.sharding import to_global
from tests.helpers import digits_config


def small(arg, **overrides):
  c = multitask_digits.get_config(arg)
  c.model.widths = (8, 16)
  c.batch_size = 16
  c.total_steps = 20
  c.log_every = 5
  c.checkpoint_every = 10
  c.optim.warmup_steps = 0
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return c


def prepared(config):
  """Setup, a step-0 state with random heads (zero heads give the trunk no gradient), a batch."""
  first = next(data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0))
  s = train.setup(config, first)
  params, model_state = train.fresh_variables(s)
  keys = iter(jax.random.split(jax.random.key(5), 100))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * jax.random.normal(next(keys), x.shape) if "heads" in str(p) else x,
      params)
  return s, params, model_state, to_global(first, s.batch_sharding)


def step_rng(config, step=0):
  return jax.random.fold_in(jax.random.key(config.seed + 1), step)


@pytest.mark.parametrize("method", [pytest.param("mgda", marks=pytest.mark.slow), "pcgrad",
                                    pytest.param("upgrad", marks=pytest.mark.slow)])
def test_representation_space_equals_explicit_per_task_gradients(method):
  config = small(f"weighting={method}", mesh__axes=(("data", 1),))
  s, params, model_state, batch = prepared(config)
  obj, rng = s.objective, step_rng(config)
  tp, fp = masks.partition(params, s.trainable)
  grads, _, metrics = obj.gradients(tp, fp, model_state, batch, rng, trainable=s.trainable)

  # Reference: each task's gradient w.r.t. z by its own jax.grad, the Gram matrix, the weights.
  x, targets = obj._inputs(batch)
  z, _, _ = obj._apply(params, model_state, x, train=True, method="features")
  def task_loss(z, t):
    outputs, _, _ = obj._apply(params, model_state, z, train=True, method="heads")
    return obj._task_losses(outputs, targets)[t]
  per_task = [jax.grad(task_loss)(z, t).ravel() for t in range(2)]
  gram = np.array([[float(a @ b) for b in per_task] for a in per_task])
  w, _ = aggregators.AGGREGATORS[method](jnp.asarray(gram), jax.random.fold_in(rng, 7))
  np.testing.assert_allclose([metrics["w_left"], metrics["w_right"]], w, rtol=1e-4, atol=1e-6)

  # The one-backward-pass gradient: trunk = d(sum_t w_t L_t)/d trunk with w fixed; heads = their
  # own task's plain gradient.
  def weighted(params, weights):
    outputs, _, _ = obj._apply(params, model_state, x, train=True)
    return jnp.sum(weights * obj._task_losses(outputs, targets))
  trunk_ref = jax.grad(weighted)(params, jnp.asarray(w))["backbone"]
  heads_ref = jax.grad(weighted)(params, jnp.ones(2))["heads"]
  for a, b in zip(jax.tree.leaves(grads["backbone"]), jax.tree.leaves(trunk_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads["heads"]), jax.tree.leaves(heads_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_shared_params_space_equals_explicit_per_task_gradients():
  config = small("weighting=mgda,grad_space=shared_params", mesh__axes=(("data", 1),))
  s, params, model_state, batch = prepared(config)
  obj, rng = s.objective, step_rng(config)
  tp, fp = masks.partition(params, s.trainable)
  grads, _, metrics = obj.gradients(tp, fp, model_state, batch, rng, trainable=s.trainable)
  x, targets = obj._inputs(batch)
  def task_loss(params, t):
    outputs, _, _ = obj._apply(params, model_state, x, train=True)
    return obj._task_losses(outputs, targets)[t]
  per_task = [jax.grad(task_loss)(params, t) for t in range(2)]
  flat = [jnp.concatenate([g.ravel() for g in jax.tree.leaves(p["backbone"])]) for p in per_task]
  gram = jnp.asarray([[float(a @ b) for b in flat] for a in flat])
  w, _ = aggregators.AGGREGATORS["mgda"](gram, jax.random.fold_in(rng, 7))
  np.testing.assert_allclose([metrics["w_left"], metrics["w_right"]], w, rtol=1e-4)
  expected = jax.tree.map(lambda a, b: w[0] * a + w[1] * b, per_task[0]["backbone"],
                          per_task[1]["backbone"])
  for a, b in zip(jax.tree.leaves(grads["backbone"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


# Every architecture and every weighting and aggregator at least once, each space once or more (the
# whole matrix runs from the CLI: see docs/multitask.md).
COMBINATIONS = [
    ("hard", "equal", "representation"), ("hard", "rlw", "representation"),
    ("hard", "dwa", "representation"), ("hard", "gradnorm", "representation"),
    ("hard", "cagrad", "representation"), ("hard", "imtl", "representation"),
    ("hard", "nash", "representation"), ("soft_l2", "static", "representation"),
    ("soft_trace", "uncertainty", "representation"), ("cross_stitch", "famo", "representation"),
    ("sluice", "gradnorm", "shared_params"), ("relationship", "upgrad", "representation"),
    ("low_supervision", "pcgrad", "representation"), ("adaptive", "mgda", "shared_params"),
]


@pytest.mark.parametrize("arch, method, space", COMBINATIONS)
def test_every_task_loss_decreases(arch, method, space):
  config = small(f"arch={arch},weighting={method},grad_space={space}", model__name="mlp",
                 model__widths=None, model__hidden=(32,), mesh__axes=(("data", 1),), optim__name="sgd",
                 optim__lr=0.3, optim__schedule="constant")
  if arch == "adaptive":
    config.multitask.arch_options.branches = ((("left",), ("right",)),)
  if arch == "low_supervision":
    config.model.hidden = (32, 32)
    config.tasks.left.depth = 1
  s, params, model_state, batch = prepared(config)
  state = train.initial_state(s, params, model_state)
  step = train.make_train_step(s)
  history = []
  for _ in range(8):  # the same batch: every task's loss must go down
    state, metrics = step(state, batch)
    history.append((float(metrics["left/loss"]), float(metrics["right/loss"])))
  first, last = history[0], history[-1]
  assert last[0] < first[0] and last[1] < first[1], history


@pytest.mark.parametrize("arg", ["arch=hard,weighting=pcgrad", "arch=cross_stitch,weighting=uncertainty"])
def test_eight_device_step_equals_one_device_step(arg):
  results = []
  for axes in ((("data", 8),), (("data", 1),)):
    # SGD: Adam's normalisation would amplify float-rounding differences of near-zero gradients.
    # XLA's own max-pool: with the CPU fast paths the sharded and unsharded programs fuse the pool's
    # input differently, a rounding difference that can move a window's maximum (about 3e-5 here
    # after 3 steps); the fast paths' own equality is tests/test_cpu_ops.py's.
    config = small(arg, mesh__axes=axes, optim__name="sgd", optim__lr=0.1,
                   model__cpu_fast_paths=False)
    batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    first = next(batches)
    s = train.setup(config, first)
    state = train.initial_state(s, *train.fresh_variables(s))
    step = train.make_train_step(s)
    for batch in itertools.islice(itertools.chain([first], batches), 3):
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    results.append(jax.device_get((state.params, state.model_state, metrics["loss"])))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_multitask_checkpoint_is_the_init_of_a_single_task_transfer(tmp_path):
  config = small("arch=hard", total_steps=4, checkpoint_every=4)
  source = jax.device_get(train.train(config, str(tmp_path / "mt")))
  transfer = digits_config("finetune", total_steps=4, init_from__workdir=str(tmp_path / "mt"))
  transfer.model.widths = (8, 16)
  batches = data.train_iterator(transfer.data, global_batch_size=transfer.batch_size, seed=0)
  s = train.setup(transfer, next(batches))
  params, _ = jax.device_get(train.init_variables(s, train.load_transfer_source(s)))
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(source.params["backbone"])):
    np.testing.assert_array_equal(a, b)


def test_bad_multitask_configs(tmp_path):
  with pytest.raises(ConfigError, match="shared representation"):
    train.setup(small("arch=soft_l2,weighting=mgda"),
                next(data.train_iterator(small("").data, global_batch_size=16, seed=0)))
  config = small("")
  config.tasks.left.kind = "multiclasss"
  with pytest.raises(ConfigError, match="unknown kind"):
    train.setup(config, next(data.train_iterator(config.data, global_batch_size=16, seed=0)))


def test_cli_with_arch_and_weighting_options(tmp_path):
  import contextlib
  import io
  err = io.StringIO()
  args = ["train", "--config=experiments/configs/multitask_digits.py:arch=cross_stitch,weighting=dwa",
          f"--workdir={tmp_path / 'run'}", "--config.model.widths=(8,16)", "--config.batch_size=16",
          "--config.total_steps=4", "--config.optim.warmup_steps=0",
          "--config.multitask.arch_options.granularity=channel",
          "--config.multitask.weighting_options.window=2"]
  with contextlib.redirect_stderr(err):
    assert cli.execute(train_entry.define_flags, train_entry.main, args) == 0, err.getvalue()[-2000:]
  with contextlib.redirect_stderr(err):
    status = cli.execute(train_entry.define_flags, train_entry.main,
                         args[:-1] + ["--config.multitask.weighting_options.windoww=2",
                                      f"--workdir={tmp_path / 'bad'}"])
  errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
  assert status == 2 and "windoww" in errors[-1] and "window" in errors[-1]
  assert not (tmp_path / "bad").exists()


def test_delta_m_against_single_task_references(tmp_path):
  from jtl import evaluate
  from jtl.metric_writer import read_jsonl
  single = small("tasks=right", total_steps=4, checkpoint_every=4)
  train.train(single, str(tmp_path / "right"))
  evaluate.evaluate_checkpoints(single, str(tmp_path / "right"))
  reference_right = read_jsonl(tmp_path / "right" / "eval_metrics.jsonl")[-1]["test/right/accuracy"]
  config = small("", total_steps=4, checkpoint_every=4)
  config.evals.test.references = {"left": 0.5, "right": str(tmp_path / "right")}
  train.train(config, str(tmp_path / "mt"))
  row = evaluate.evaluate_checkpoints(config, str(tmp_path / "mt"))[-1]
  expected = 50 * ((row["test/left/accuracy"] - 0.5) / 0.5
                   + (row["test/right/accuracy"] - reference_right) / reference_right)
  np.testing.assert_allclose(row["test/delta_m"], expected, rtol=1e-6)


@pytest.mark.parametrize("method", ["mgda", "pcgrad"])
def test_the_trainer_applies_the_aggregated_gradient_not_the_equal_weight_one(method):
  """One trainer step moves the parameters by the optimizer's update of the hand-aggregated gradient
  (per-task gradients w.r.t. z by their own jax.grad, the aggregator's weights from their Gram
  matrix), which differs from the update of the plain (equal-weight) gradient of the loss."""
  # SGD: the update is linear in the gradient. An MLP: no max-pool, whose gradient at the ties of a
  # digit's flat background is a choice (jit and op-by-op may route it to different inputs).
  config = small(f"weighting={method}", model__name="mlp", model__widths=None, model__hidden=(32,),
                 mesh__axes=(("data", 1),), optim__name="sgd", optim__lr=0.1,
                 optim__schedule="constant")
  s, params, model_state, batch = prepared(config)
  obj, rng = s.objective, step_rng(config)
  params = jax.device_get(params)
  x, targets = obj._inputs(batch)
  z, _, _ = obj._apply(params, model_state, x, train=True, method="features")

  def task_loss(z, t):
    outputs, _, _ = obj._apply(params, model_state, z, train=True, method="heads")
    return obj._task_losses(outputs, targets)[t]
  per_task = [np.asarray(jax.grad(task_loss)(z, t), np.float64).ravel() for t in range(2)]
  gram = np.array([[a @ b for b in per_task] for a in per_task])
  w, _ = aggregators.AGGREGATORS[method](jnp.asarray(gram, jnp.float32), jax.random.fold_in(rng, 7))
  w = np.asarray(w)

  def weighted(params, weights):
    outputs, _, _ = obj._apply(params, model_state, x, train=True)
    return jnp.sum(weights * obj._task_losses(outputs, targets))
  reference = {**jax.grad(weighted)(params, jnp.ones(2)),
               "backbone": jax.grad(weighted)(params, jnp.asarray(w))["backbone"]}
  equal = jax.grad(weighted)(params, jnp.full(2, 0.5))

  def moved(grads):  # the parameters after the optimizer's first update with these gradients
    tp, _ = masks.partition(params, s.trainable)
    updates, _ = s.tx.update(masks.partition(grads, s.trainable)[0], s.tx.init(tp), tp)
    return jax.device_get(optax.apply_updates(tp, updates))["backbone"]

  state = train.initial_state(s, params, model_state)
  state, _ = train.make_train_step(s)(state, batch)
  got = jax.device_get(state.params)["backbone"]
  expected, equal_weight = moved(reference), moved(equal)
  gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(expected),
                                                         jax.tree.leaves(equal_weight)))
  assert gap > 1e-4, (method, w)  # the aggregator changes the update: the check below can fail
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=gap / 20)
