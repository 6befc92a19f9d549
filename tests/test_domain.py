"""Domain adaptation objectives (DANN, CORAL, MMD) on the printed -> handwritten digits mixture.

Small MLPs keep compilation cheap; `use_bn=True` where BatchNorm statistics over the two domains
matter (training, sharding)."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import coral_digits, dann_digits, pretrain_digits
from jtl import data, evaluate, objectives, train
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl
from jtl.sharding import to_global
from tests.helpers import hand_split_metrics
from tests.test_losses_domain import np_mmd

MLP = dict(name="mlp", num_classes=10, hidden=(16,))
MLP_BN = dict(MLP, use_bn=True)


def tiny(config, model=MLP, **overrides):
  config.update_from_flattened_dict({"total_steps": 4, "batch_size": 16, "log_every": 2,
                                     "checkpoint_every": 4, "optim.warmup_steps": 1})
  config.model = ml_collections.ConfigDict(model)
  config.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return config


@pytest.fixture(scope="module")
def batches():
  """Two mixture batches {'source': 8 printed, 'target': 8 handwritten}, as the trainer gets them."""
  config = tiny(dann_digits.get_config("mode=dann"))
  return list(itertools.islice(data.train_iterator(config.data, global_batch_size=16, seed=0), 2))


def test_dann_trains_through_the_trainer_and_evaluates_on_both_domains(tmp_path):
  config = tiny(dann_digits.get_config("mode=dann"), MLP_BN, mesh__axes=(("data", 1),))
  state = train.train(config, str(tmp_path))
  assert int(state.model_state["domain"]["step"]) == 4  # the schedule's step counter
  logged = read_jsonl(tmp_path / "train_metrics.jsonl")
  # lambda_p at p = step / total_steps, averaged over each logging window of two steps.
  lam = 2 / (1 + np.exp(-10 * np.arange(4) / 4)) - 1
  np.testing.assert_allclose([row["lambda"] for row in logged], [lam[:2].mean(), lam[2:].mean()],
                             rtol=1e-5)
  assert all(np.isfinite(row["domain_loss"]) for row in logged)
  evaluate.evaluate_checkpoints(None, str(tmp_path))
  row = read_jsonl(tmp_path / "eval_metrics.jsonl")[-1]
  assert row["test/target/num_examples"] == 359 and row["test/source/num_examples"] == 500
  # Each domain's accuracy and loss equal the classifier's own logits on that member's test split,
  # by hand (the domain step counter is no model variable).
  s = train.setup(config, next(data.train_iterator(config.data, global_batch_size=16, seed=0)))
  params, model_state = jax.device_get((state.params, state.model_state))
  variables = {"params": {k: params[k] for k in ("backbone", "head")},
               **{k: v for k, v in model_state.items() if k != "domain"}}
  for name, member in data.mixture_members(config.data).items():
    loss, accuracy, n = hand_split_metrics(s.objective.model, variables, member, "test")
    assert row[f"test/{name}/num_examples"] == n
    assert row[f"test/{name}/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert row[f"test/{name}/loss"] == pytest.approx(loss, rel=1e-5)
  assert 0.0 <= row["test/target/domain_accuracy"] <= 1.0


@pytest.fixture(scope="module")
def dann(batches):
  """(setup, params, model_state) of a one-device DANN with a random head (the default is zeros,
  which would leave the backbone without a cross-entropy gradient)."""
  s = train.setup(tiny(dann_digits.get_config("mode=dann"), mesh__axes=(("data", 1),)), batches[0])
  params, model_state = jax.device_get(train.fresh_variables(s))
  params["head"]["kernel"] = np.asarray(jax.random.normal(jax.random.key(1),
                                                          params["head"]["kernel"].shape))
  model_state["domain"]["step"] = np.int32(1)  # p = 1/4
  return s, params, model_state


def test_target_labels_never_reach_the_loss(dann, batches):
  s, params, model_state = dann
  batch = batches[0]
  scrambled = {**batch, "target": {**batch["target"],
                                   "label": np.full_like(batch["target"]["label"], 99)}}

  @jax.jit
  def loss_and_grads(batch):
    return jax.value_and_grad(lambda p: s.objective.loss(
        p, model_state, batch, jax.random.key(0), trainable=s.trainable)[0])(params)

  for a, b in zip(jax.tree.leaves(loss_and_grads(batch)), jax.tree.leaves(loss_and_grads(scrambled))):
    np.testing.assert_array_equal(a, b)


def test_dann_gradients_are_ce_minus_lambda_times_the_domain_gradient_on_the_backbone(dann, batches):
  """Written without a reversal layer: the backbone gets dCE - lambda dBCE, the domain classifier
  dBCE, the head dCE."""
  s, params, model_state = dann
  lam = 2 / (1 + np.exp(-10 * 0.25)) - 1
  batch = batches[0]
  objective = s.objective
  images = np.concatenate([batch["source"]["image"], batch["target"]["image"]])
  n = batch["source"]["image"].shape[0]

  def features(backbone):
    return objective.model.apply({"params": {**params, "backbone": backbone}}, images,
                                 method="features")

  def ce(backbone, head):
    logits = features(backbone)[:n] @ head["kernel"] + head["bias"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         batch["source"]["label"][:, None], axis=1))

  def bce(backbone, classifier):
    logits = objective.domain_classifier.apply({"params": classifier}, features(backbone))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.arange(2 * n) >= n))

  @jax.jit
  def both(params):
    ce_backbone, ce_head = jax.grad(ce, argnums=(0, 1))(params["backbone"], params["head"])
    bce_backbone, bce_classifier = jax.grad(bce, argnums=(0, 1))(params["backbone"],
                                                                 params["domain_classifier"])
    grads = jax.grad(lambda p: objective.loss(p, model_state, batch, jax.random.key(0),
                                              trainable=s.trainable)[0])(params)
    expected = {"backbone": jax.tree.map(lambda a, b: a - lam * b, ce_backbone, bce_backbone),
                "head": ce_head, "domain_classifier": bce_classifier}
    return grads, expected

  grads, expected = both(params)
  for key, tree in expected.items():
    for a, b in zip(jax.tree.leaves(grads[key]), jax.tree.leaves(tree)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eight_device_step_equals_one_device_step(batches):
  """DANN (BatchNorm over both domains, the reversal layer, the step counter) on 8 devices == 1."""
  assert jax.device_count() == 8
  results, variables = [], None
  for axes in ((("data", 1),), (("data", 8),)):
    # SGD: Adam divides by sqrt(v), which turns rounding noise in a gradient that is ~0 in exact
    # arithmetic (a Dense bias just before BatchNorm) into a full-size step.
    s = train.setup(tiny(dann_digits.get_config("mode=dann"), dict(MLP_BN, head_init="lecun_normal"),
                         mesh__axes=axes, optim__name="sgd"), batches[0])
    variables = variables or jax.device_get(train.fresh_variables(s))
    state = train.initial_state(s, *variables)
    step = train.make_train_step(s)
    for batch in batches:
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    results.append(jax.device_get((state.params, state.model_state, metrics)))
  assert int(results[0][1]["domain"]["step"]) == 2
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_source_only_ignores_the_target_and_coral_mmd_add_their_term(dann, batches):
  """weight 0: the loss is the source cross-entropy; coral/mmd: CE + weight * the discrepancy of the
  two domains' features, computed here from the backbone's features. (The same model config as the
  DANN fixture, so its backbone and head serve.)"""
  _, dann_params, _ = dann
  params = {k: dann_params[k] for k in ("backbone", "head")}
  trainable = jax.tree.map(lambda _: True, params)
  batch = batches[0]
  n = batch["source"]["image"].shape[0]
  objective = objectives.build(tiny(dann_digits.get_config("mode=source_only")))
  logits = objective.model.apply({"params": params}, batch["source"]["image"])
  log_q = jax.nn.log_softmax(logits)
  ce = -np.mean(np.take_along_axis(np.asarray(log_q), batch["source"]["label"][:, None], axis=1))
  # The target's images are all NaN here: a source-only loss that looked at them would be NaN.
  poisoned = {**batch, "target": {**batch["target"],
                                  "image": np.full_like(batch["target"]["image"], np.nan)}}
  loss, (_, metrics) = objective.loss(params, {}, poisoned, jax.random.key(0), trainable=trainable)
  np.testing.assert_allclose(loss, ce, rtol=1e-5)
  assert sorted(metrics) == ["source_accuracy", "source_ce"]
  features = np.float64(objective.model.apply({"params": params}, np.concatenate(
      [batch["source"]["image"], batch["target"]["image"]]), method="features"))
  # Independent numpy references (test_losses_domain): CORAL from np.cov, the default MMD (biased,
  # bandwidths 0.25..4 x the mean squared distance of distinct pooled pairs) by loops over pairs.
  def np_coral(a, b):
    return np.sum((np.cov(a, rowvar=False) - np.cov(b, rowvar=False)) ** 2) / (4 * a.shape[1] ** 2)

  def np_default_mmd(a, b):
    pooled = np.concatenate([a, b])
    d2 = [np.sum((x - y) ** 2) for i, x in enumerate(pooled) for j, y in enumerate(pooled) if i != j]
    return np_mmd(a, b, [m * np.mean(d2) for m in (0.25, 0.5, 1.0, 2.0, 4.0)], "biased")
  for method, discrepancy in (("coral", np_coral), ("mmd", np_default_mmd)):
    objective = objectives.build(tiny(coral_digits.get_config(f"method={method},weight=0.5")))
    loss, (_, metrics) = objective.loss(params, {}, batch, jax.random.key(0), trainable=trainable)
    term = discrepancy(features[:n], features[n:])
    assert float(term) > 0
    np.testing.assert_allclose(loss, ce + 0.5 * term, rtol=1e-5)
    np.testing.assert_allclose(metrics[method], term, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"data.mixture": ml_collections.ConfigDict({"source": dict(name="printed_digits")})},
     "needs data.mixture members"),
    ({"domain.mmd_estimator": "u-stat"}, "unknown domain.mmd_estimator"),
    ({"domain.weight": -1.0}, "domain.weight"),
    ({"domain.wieght": 1.0}, "did you mean 'weight'"),
])
def test_bad_domain_configs_are_one_line_errors(overrides, message):
  config = dann_digits.get_config("mode=dann")
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    objectives.build(config)


@pytest.mark.parametrize("config", ["dann_digits.py:mode=dann", "coral_digits.py:method=mmd"])
def test_init_starts_from_a_pretrained_backbone_with_a_fresh_head_and_domain_classifier(
    config, batches, tmp_path):
  """`init=RUN` (the sweep's glyph-backbone rows): step 0 holds RUN's backbone (parameters and
  BatchNorm statistics); the head, DANN's domain classifier and its schedule's step, which a
  classifier's run lacks, are the fresh init's. Without `init`, nothing is loaded."""
  pretrain = tiny(pretrain_digits.get_config(), MLP_BN, mesh__axes=(("data", 1),))  # a classifier
  source = train.train(pretrain, str(tmp_path / "pre"))
  module = {"dann_digits.py": dann_digits, "coral_digits.py": coral_digits}[config.split(":")[0]]
  arg = config.split(":")[1]
  fresh_setup = train.setup(tiny(module.get_config(arg), MLP_BN, mesh__axes=(("data", 1),)),
                            batches[0])
  fresh = jax.device_get(train.fresh_variables(fresh_setup))
  assert train.load_transfer_source(fresh_setup) is None
  s = train.setup(tiny(module.get_config(f"{arg},init={tmp_path / 'pre'}"), MLP_BN,
                       mesh__axes=(("data", 1),)), batches[0])
  params, model_state = jax.device_get(train.init_variables(s, train.load_transfer_source(s)))
  loaded = jax.device_get((source.params, source.model_state))
  jax.tree.map(np.testing.assert_array_equal, params["backbone"], loaded[0]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, model_state["batch_stats"]["backbone"],
               loaded[1]["batch_stats"]["backbone"])
  assert not np.array_equal(params["backbone"]["dense0"]["kernel"],
                            fresh[0]["backbone"]["dense0"]["kernel"])  # (it did load something)
  for fresh_part in ("head", "domain_classifier"):
    if fresh_part in params:
      jax.tree.map(np.testing.assert_array_equal, params[fresh_part], fresh[0][fresh_part])
  assert ("domain_classifier" in params) == ("dann" in config)
  assert int(model_state.get("domain", {"step": 0})["step"]) == 0
