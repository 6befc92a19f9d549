"""Tests for jtl.multitask.archs (and jtl.models.stages) against plain NumPy references.

Compilations are the cost here, so variables come from `jax.eval_shape(init)` filled with NumPy
random values (no init compile), and each model is applied under one `jax.jit` where possible.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jtl import models
from jtl.errors import ConfigError
from jtl.models import stages
from jtl.multitask import adaptive, archs, relationship, towers
from jtl.multitask.tasks import Task

CNN = dict(name="cnn_small", widths=(4, 8))
MLP = dict(name="mlp", hidden=(8, 6), use_bn=True)
TASKS = (Task("cls", "multiclass", "cls", 3, depth=1), Task("bin", "binary", "bin", 1),
         Task("ml", "multilabel", "ml", 2, depth=1), Task("reg", "regression", "reg", 2))
TWO = (Task("a", "multiclass", "a", 3), Task("b", "regression", "b", 2))
X = np.asarray(jax.random.normal(jax.random.key(1), (4, 12, 12, 1)))
# Compiling dominates this file's run time, and the tests check values, not XLA's optimisations.
jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_llvm_disable_expensive_passes=True))


def fake_variables(module, x=X, seed=0, scale=0.3, method=None):
  """Variables shaped like `module.init`'s, filled with NumPy values (random params, valid state)."""
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False, method=method), x)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    if "'count'" in name:
      return np.zeros(s.shape, s.dtype)
    if "cov_" in name:
      return np.eye(s.shape[0], dtype=s.dtype)
    return (scale * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def heads_np(params, features):
  """NumPy reference of `heads/<task>` = features @ kernel + bias."""
  return {t: np.asarray(features[t]) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
          for t, p in params["heads"].items()}


def assert_outputs_close(actual, expected, atol=1e-5):
  assert set(actual) == set(expected)
  for name in expected:
    np.testing.assert_allclose(np.asarray(actual[name]), np.asarray(expected[name]), atol=atol,
                               rtol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------------------- stages

def test_staged_backbones_match_the_registry_backbones():
  from jtl.models.resnet import ResNet
  x_imagenet = np.asarray(jax.random.normal(jax.random.key(2), (2, 16, 16, 1)))
  cases = [(models.build(config, num_classes=0).backbone, stages.staged(config), X)
           for config in (MLP, CNN, dict(name="resnet_small", stage_sizes=(1, 2), width=4))]
  # The imagenet stem (resnet18..101) on a tiny ResNet.
  cases.append((ResNet(stage_sizes=(1, 1), width=4, stem="imagenet"),
                stages.StagedResNet(stage_sizes=(1, 1), width=4, stem="imagenet"), x_imagenet))
  variables = [fake_variables(reference, x=x) for reference, _, x in cases]
  for (reference, trunk, x), v in zip(cases, variables):
    assert jax.tree.structure(fake_variables(trunk, x=x)) == jax.tree.structure(v)
    owned = [p for k in range(1, trunk.num_stages + 1) for p in trunk.stage_prefixes(k)]
    assert sorted(owned) == sorted(v["params"])  # the stages partition the backbone

  @jit
  def run(variables):
    return [tuple(m.apply(v, x, train=True, mutable=["batch_stats"]) for m in (reference, trunk))
            for (reference, trunk, x), v in zip(cases, variables)]
  for (expected, actual), (_, trunk, _) in zip(run(variables), cases):
    np.testing.assert_allclose(actual[0], expected[0], atol=1e-6, err_msg=type(trunk).__name__)
    jax.tree.map(np.testing.assert_array_equal, actual[1], expected[1])
  assert [c[1].stage_widths for c in cases] == [(8, 6), (4, 8), (4, 8), (4, 8)]


def test_models_without_stages_are_config_errors():
  with pytest.raises(ConfigError, match=r"cross_stitch.*vit_tiny.*mlp, cnn_small, resnet_small"):
    archs.build("cross_stitch", TWO, dict(name="vit_tiny", patch_size=4), {})
  with pytest.raises(ConfigError, match="no stage"):
    archs.build("sluice", TWO, dict(name="mlp", hidden=()), {})


# --------------------------------------------------------------------------- every arch, every kind

@pytest.mark.parametrize("model_config", [CNN, MLP], ids=["cnn_small", "mlp"])
def test_every_arch_runs_under_jit_for_every_task_kind(model_config):
  modules = {arch: archs.build(arch, TASKS, model_config, {}) for arch in archs.ARCHS}
  variables = {arch: fake_variables(m) for arch, m in modules.items()}

  @jit
  def run(variables, x):
    return {arch: m.apply(variables[arch], x, train=True,
                          mutable=[c for c in variables[arch] if c != "params"])
            for arch, m in modules.items()}

  results = run(variables, X)
  for arch, ((outputs, penalties), state) in results.items():
    assert {n: o.shape for n, o in outputs.items()} == {t.name: (4, t.num_outputs) for t in TASKS}
    assert all(o.dtype == jnp.float32 and np.isfinite(o).all() for o in outputs.values()), arch
    for name, value in penalties.items():
      assert value.shape == () and np.isfinite(value), (arch, name)
    assert set(state) == set(variables[arch]) - {"params"}, arch
    assert modules[arch].shared_representation == (arch in ("hard", "relationship",
                                                            "low_supervision"))
  assert set(results["soft_l2"][0][1]) == {"soft_l2"}
  assert set(results["sluice"][0][1]) == {"orthogonality"}
  assert set(results["relationship"][1]) == {"batch_stats", "relationship"}


# --------------------------------------------------------------------------------------------- hard

def test_hard_paths_features_heads_and_single_task_checkpoints():
  module = archs.build("hard", TASKS, CNN, {})
  variables = fake_variables(module)
  params = flat(variables["params"])
  assert {p.split("/")[0] for p in params} == {"backbone", "heads"}
  assert {p for p in params if p.startswith("heads/")} == {
      f"heads/{t.name}/{leaf}" for t in TASKS for leaf in ("kernel", "bias")}
  # The single-task registry model has exactly the same paths and shapes under backbone/.
  single = models.build(dict(CNN, num_classes=5))
  single_variables = fake_variables(single, seed=1)
  for collection in ("params", "batch_stats"):
    assert (jax.tree.map(np.shape, single_variables[collection]["backbone"])
            == jax.tree.map(np.shape, variables[collection]["backbone"]))

  @jit
  def run(variables, single_variables, x):
    z, _ = module.apply(variables, x, method="features")
    from_z, _ = module.apply(variables, z, method="heads")
    whole, penalties = module.apply(variables, x)
    loaded = {c: {**single_variables[c], "backbone": variables[c]["backbone"]}
              for c in single_variables}
    return z, from_z, whole, penalties, single.apply(loaded, x, method="features")

  z, from_z, whole, penalties, single_features = run(variables, single_variables, X)
  assert z.shape == (4, 8) and penalties == {}
  assert_outputs_close(from_z, whole, atol=0)
  assert_outputs_close(whole, heads_np(variables["params"], {t.name: z for t in TASKS}))
  np.testing.assert_allclose(single_features, z, atol=1e-6)  # the hard trunk loads as is


def test_heads_start_at_zero():
  from jtl.multitask.trunk import TaskHeads
  params = TaskHeads(TWO).init(jax.random.key(0), {"a": np.ones((1, 4)), "b": np.ones((1, 2))})
  assert jax.tree.map(np.shape, params["params"]) == {"a": {"kernel": (4, 3), "bias": (3,)},
                                                     "b": {"kernel": (2, 2), "bias": (2,)}}
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(leaf, 0.0)


# ------------------------------------------------------------------------------------- soft sharing

def _kernels(towers):
  return {t: [v for p, v in sorted(flat(tree).items()) if p.endswith("kernel")]
          for t, tree in towers.items()}


def test_soft_l2_and_trace_penalties_match_numpy():
  tasks = TWO + (Task("c", "binary", "c", 1),)
  l2 = archs.build("soft_l2", tasks, MLP, dict(weight=0.5))
  trace = archs.build("soft_trace", tasks, MLP, dict(weight=0.5))
  variables = fake_variables(l2)
  towers = variables["params"]["towers"]
  equal = {**variables, "params": {**variables["params"],
                                   "towers": {t: towers["a"] for t in towers}}}
  only_first = archs.build("soft_l2", tasks, MLP, dict(weight=1.0, leaves=(("dense0/kernel", True),
                                                                           (".*", False))))

  @jit
  def run(variables, equal):
    penalties = [(l2.apply(v, X)[1]["soft_l2"], trace.apply(v, X)[1]["trace_norm"])
                 for v in (variables, equal)]
    grads = jax.grad(lambda p: trace.apply({**equal, "params": p}, X)[1]["trace_norm"])(
        equal["params"])
    return penalties, grads, only_first.apply(variables, X)[1]["soft_l2"]

  def numpy_penalties(towers):
    kernels = _kernels(towers)
    pairs = sum(np.sum((wi - wj) ** 2) for i, j in itertools.combinations(kernels, 2)
                for wi, wj in zip(kernels[i], kernels[j]))
    nuclear = sum(np.linalg.svd(np.stack([k.reshape(-1) for k in leaf], axis=1), compute_uv=False).sum()
                  for leaf in zip(*kernels.values()))
    return 0.5 * pairs, 0.5 * nuclear

  penalties, grads, first_layer = run(variables, equal)
  for got, tree in zip(penalties, (variables, equal)):
    np.testing.assert_allclose(got, numpy_penalties(tree["params"]["towers"]), rtol=2e-5)
  got_l2, got_trace = penalties[1]
  assert got_l2 == 0.0
  # A rank-1 stack: the nuclear norm is sqrt(T) * ||w|| per leaf.
  np.testing.assert_allclose(got_trace, 0.5 * sum(np.sqrt(3) * np.linalg.norm(k)
                                                  for k in _kernels(towers)["a"]), rtol=2e-5)
  # The trace norm's gradient stays finite at equal towers (zero singular values).
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # A rule table selects the leaves: only the first layer's kernel.
  expected = sum(np.sum((np.asarray(towers[i]["dense0"]["kernel"])
                         - np.asarray(towers[j]["dense0"]["kernel"])) ** 2)
                 for i, j in itertools.combinations(towers, 2))
  np.testing.assert_allclose(first_layer, expected, rtol=2e-5)
  with pytest.raises(ConfigError, match="matches no parameter"):
    bad = archs.build("soft_l2", tasks, MLP, dict(leaves=(("stage9/.*", True), (".*", False))))
    jax.eval_shape(lambda v: bad.apply(v, X), variables)


# ------------------------------------------------------------------------------------- cross-stitch

def test_cross_stitch_identity_is_independent_towers_and_any_alpha_mixes_stage_outputs():
  module = archs.build("cross_stitch", TWO, CNN, {})
  variables = fake_variables(module)
  units = variables["params"]["cross_stitch"]
  assert set(units) == {"stage1", "stage2"}
  identity = {**variables, "params": {**variables["params"],
                                      "cross_stitch": {k: np.eye(2, dtype=np.float32) for k in units}}}
  tower = stages.staged(CNN)

  @jit
  def run(identity, variables):
    identity_run = module.apply(identity, X, train=True, mutable=["batch_stats"])
    alone = {t: tower.apply({c: identity[c]["towers"][t] for c in identity}, X, True,
                            mutable=["batch_stats"]) for t in ("a", "b")}
    # Any alpha, eval mode: the towers stage by stage with x'_t = sum_s alpha[t, s] x_s.
    xs = {t: X for t in ("a", "b")}
    for k in (1, 2):
      xs = {t: tower.apply({c: variables[c]["towers"][t] for c in variables}, xs[t], False, k,
                           method="stage") for t in xs}
      alpha = variables["params"]["cross_stitch"][f"stage{k}"]
      xs = {t: sum(alpha[i, j] * xs[s] for j, s in enumerate(xs)) for i, t in enumerate(xs)}
    return identity_run, alone, module.apply(variables, X)[0], xs

  ((outputs, _), state), alone, mixed_outputs, xs = run(identity, variables)
  assert_outputs_close(outputs, heads_np(identity["params"], {t: alone[t][0] for t in alone}))
  for t in ("a", "b"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state["batch_stats"]["towers"][t], alone[t][1]["batch_stats"])
  assert_outputs_close(mixed_outputs, heads_np(variables["params"],
                                               {t: np.asarray(v).mean(axis=(1, 2))
                                                for t, v in xs.items()}), atol=1e-4)


def test_cross_stitch_init_and_options():
  tasks = TWO + (Task("c", "binary", "c", 1),)
  module = archs.build("cross_stitch", tasks, dict(name="mlp", hidden=(3, 5)),
                       dict(granularity="channel", stitch_after=(2,)))
  assert set(fake_variables(module)["params"]["cross_stitch"]) == {"stage2"}
  units = towers.CrossStitchUnits(3, ((2, 5),), "channel", 0.9)
  alphas = units.init(jax.random.key(0), np.ones((3, 1, 5), np.float32), 2)["params"]
  assert alphas["stage2"].shape == (3, 3, 5)
  expected = np.full((3, 3), 0.05) + 0.85 * np.eye(3)
  np.testing.assert_allclose(alphas["stage2"], np.broadcast_to(expected[..., None], (3, 3, 5)),
                             rtol=1e-6)
  with pytest.raises(ConfigError, match=r"stitch_after.*1\.\.2"):
    archs.build("cross_stitch", tasks, dict(name="mlp", hidden=(3, 5)), dict(stitch_after=(3,)))
  with pytest.raises(ConfigError, match="granularity"):
    archs.build("cross_stitch", tasks, CNN, dict(granularity="pixel"))


# ------------------------------------------------------------------------------------------- sluice

def _sluice_reference(variables, tower, names, subspaces):
  """NumPy sluice forward from the towers' stages alone: outputs, orthogonality sums (mean, sum)."""
  params = variables["params"]
  stage = jit(lambda v, x, k: tower.apply(v, x, False, k, method="stage"), static_argnums=2)
  xs, pooled, penalty = {t: X for t in names}, [], np.zeros(2)
  width = max(tower.stage_widths)
  for k in range(1, tower.num_stages + 1):
    xs = {t: np.asarray(stage({c: variables[c]["towers"][t] for c in variables},
                              xs[t].astype(np.float32), k), np.float64) for t in names}
    size = xs[names[0]].shape[-1] // subspaces
    groups = {(t, m): xs[t][..., m * size:(m + 1) * size] for t in names for m in range(subspaces)}
    for t in names:
      for m, n in itertools.combinations(range(subspaces), 2):
        g_m, g_n = (groups[t, i].reshape(-1, size) for i in (m, n))
        penalty += [np.sum((g_m.T @ g_n / len(g_m)) ** 2), np.sum((g_m.T @ g_n) ** 2)]
    alpha = np.asarray(params["sluice"][f"alpha_stage{k}"])
    keys = list(groups)  # (t, m) in row order t * M + m
    mixed = {key: sum(alpha[i, j] * groups[other] for j, other in enumerate(keys))
             for i, key in enumerate(keys)}
    xs = {t: np.concatenate([mixed[t, m] for m in range(subspaces)], axis=-1) for t in names}
    pooled.append({t: np.pad(v.reshape(len(v), -1, v.shape[-1]).mean(axis=1),
                             ((0, 0), (0, width - v.shape[-1]))) for t, v in xs.items()})
  beta = np.asarray(params["sluice"]["beta"])
  features = {t: sum(beta[i, k] * pooled[k][t] for k in range(len(pooled)))
              for i, t in enumerate(names)}
  return heads_np(params, features), penalty


def test_sluice_matches_numpy_and_orthogonality_on_captured_activations():
  config = dict(name="cnn_small", widths=(4, 6))
  module = archs.build("sluice", TWO, config, dict(subspaces=2, weight=0.7))
  paper = archs.build("sluice", TWO, config, dict(subspaces=2, orthogonality_rows="sum", weight=1.0))
  variables = fake_variables(module)
  ((outputs, penalties), captured), paper_penalties = jit(lambda v: (module.apply(
      v, X, capture_intermediates=lambda mdl, method: method == "stage", mutable=["intermediates"]),
      paper.apply(v, X)[1]))(variables)
  expected, (mean_rows, sum_rows) = _sluice_reference(variables, stages.staged(config), ("a", "b"), 2)
  assert_outputs_close(outputs, expected, atol=1e-4)
  np.testing.assert_allclose(penalties["orthogonality"], 0.7 * mean_rows, rtol=1e-4)
  np.testing.assert_allclose(paper_penalties["orthogonality"], sum_rows, rtol=1e-4)
  # The same penalty from the activations flax captured at each tower's stage outputs.
  captured_penalty = 0.0
  for t in ("a", "b"):
    for act in captured["intermediates"]["towers"][t]["stage"]:
      g = np.asarray(act, np.float64).reshape(-1, act.shape[-1])
      half = g.shape[1] // 2
      captured_penalty += np.sum((g[:, :half].T @ g[:, half:] / len(g)) ** 2)
  np.testing.assert_allclose(penalties["orthogonality"], 0.7 * captured_penalty, rtol=1e-4)


def test_sluice_reductions_to_towers_and_to_hard_sharing():
  module = archs.build("sluice", TWO, CNN, dict(subspaces=2))
  variables = fake_variables(module)
  params = variables["params"]
  # Init: alpha row-stochastic with 0.9 on the diagonal; beta one-hot on the top stage.
  units = towers.SluiceUnits(2, 2, 2, 0.9, 1.0)
  init = units.init(jax.random.key(0), np.ones((2, 1, 4), np.float32), 1)["params"]
  np.testing.assert_allclose(init["alpha_stage1"],
                             np.full((4, 4), 0.1 / 3) + (0.9 - 0.1 / 3) * np.eye(4), rtol=1e-6)
  np.testing.assert_array_equal(init["beta"], [[0.0, 1.0], [0.0, 1.0]])
  # alpha = I, beta one-hot on the top: T independent towers.
  towers_only = {**params, "sluice": {**{f"alpha_stage{k}": np.eye(4, dtype=np.float32) for k in (1, 2)},
                                      "beta": np.array([[0.0, 1.0]] * 2, np.float32)}}
  # alpha[(t,m),(s,n)] = delta_mn / T with equal towers: hard sharing with that trunk.
  hard = archs.build("hard", TWO, CNN, {})
  hard_variables = fake_variables(hard, seed=3)
  averaging = np.kron(np.full((2, 2), 0.5), np.eye(2)).astype(np.float32)
  shared = {c: {**variables[c], "towers": {t: hard_variables[c]["backbone"] for t in ("a", "b")}}
            for c in variables}
  shared["params"]["sluice"] = {**towers_only["sluice"], "alpha_stage1": averaging,
                                "alpha_stage2": averaging}
  shared["params"]["heads"] = hard_variables["params"]["heads"]
  tower = stages.staged(CNN)

  @jit
  def run(towers_only, shared, hard_variables):
    features = {t: tower.apply({c: variables[c]["towers"][t] for c in variables}, X, False)
                for t in ("a", "b")}
    return (module.apply(towers_only, X)[0], features, module.apply(shared, X)[0],
            hard.apply(hard_variables, X)[0])
  independent, features, sluice_shared, hard_outputs = run({**variables, "params": towers_only},
                                                           shared, hard_variables)
  assert_outputs_close(independent, heads_np(params, features))
  assert_outputs_close(sluice_shared, hard_outputs)
  with pytest.raises(ConfigError, match="subspaces=3 must divide"):
    archs.build("sluice", TWO, CNN, dict(subspaces=3))


# ------------------------------------------------------------------------------------- relationship

def _kron_penalty(w, covariances):
  # vec row-major: W[i, j, t] at (i * D_out + j) * T + t, so the covariance is S_in (x) S_out (x) S_task.
  sigma = np.kron(np.kron(covariances[0], covariances[1]), covariances[2])
  v = w.reshape(-1)
  return 0.5 * v @ np.linalg.solve(sigma, v)


def _numpy_flip_flop(w, covariances, eps):
  s_in, s_out, s_task = (np.asarray(c, np.float64) for c in covariances)
  d_in, d_out, d_task = w.shape

  def normalise(moment):
    return (1 - eps) * len(moment) * moment / np.trace(moment) + eps * np.eye(len(moment))
  w1 = w.reshape(d_in, d_out * d_task)  # columns (j, t): covariance S_out (x) S_task
  s_in = normalise(w1 @ np.linalg.solve(np.kron(s_out, s_task), w1.T) / (d_out * d_task))
  w2 = w.transpose(1, 0, 2).reshape(d_out, d_in * d_task)  # columns (i, t)
  s_out = normalise(w2 @ np.linalg.solve(np.kron(s_in, s_task), w2.T) / (d_in * d_task))
  w3 = w.transpose(2, 0, 1).reshape(d_task, d_in * d_out)  # columns (i, j)
  s_task = normalise(w3 @ np.linalg.solve(np.kron(s_in, s_out), w3.T) / (d_in * d_out))
  return s_in, s_out, s_task


def _random_spd(rng, n):
  a = rng.standard_normal((n, n))
  return (a @ a.T / n + 0.5 * np.eye(n)).astype(np.float32)


def test_relationship_penalty_and_flip_flop_match_explicit_kronecker_products():
  module = archs.build("relationship", TWO, dict(name="mlp", hidden=(3,)),
                       dict(width=2, weight=0.4, eps=0.05, cov_update_every=2))
  variables = fake_variables(module)
  rng = np.random.default_rng(5)
  covs = {"cov_in": _random_spd(rng, 3), "cov_out": _random_spd(rng, 2), "cov_task": _random_spd(rng, 2)}
  state = {"relationship": {"relationship": {"count": np.int32(0), "layer0": covs}}}
  assert jax.tree.structure(state) == jax.tree.structure(
      {"relationship": variables["relationship"]})
  variables = {**variables, **state}
  kernel = np.asarray(variables["params"]["relationship"]["layer0"]["kernel"], np.float64)
  w = kernel.transpose(1, 2, 0)  # [D_in, D_out, T]
  assert kernel.shape == (2, 3, 2)
  step = jit(lambda v, train: module.apply(v, X, train=train, mutable=["relationship"]),
                 static_argnums=1)
  (_, penalties), unchanged = step(variables, False)
  np.testing.assert_allclose(penalties["relationship"], 0.4 * _kron_penalty(w, list(covs.values())),
                             rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, unchanged["relationship"], state["relationship"])
  # The closed-form sweep itself.
  got = jit(relationship.flip_flop, static_argnums=2)(jnp.asarray(w, jnp.float32),
                                                         tuple(covs.values()), 0.05)
  for actual, expected in zip(got, _numpy_flip_flop(w, list(covs.values()), 0.05)):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)
  # Train calls: re-estimate at count 0, 2, 4, ... and the penalty uses the new estimate.
  history = []
  for _ in range(3):
    (_, penalties), new_state = step(variables, True)
    history.append((variables["relationship"]["relationship"], new_state["relationship"]["relationship"],
                    penalties["relationship"]))
    variables = {**variables, **new_state}
    variables["params"] = jax.tree.map(lambda p: p * 1.1, variables["params"])  # new weights
  (before, after, penalty), (before1, after1, _), (before2, after2, _) = history
  expected = _numpy_flip_flop(w, list(covs.values()), 0.05)
  for key, value in zip(("cov_in", "cov_out", "cov_task"), expected):
    np.testing.assert_allclose(after["layer0"][key], value, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(penalty, 0.4 * _kron_penalty(w, expected), rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, after1["layer0"], before1["layer0"])  # count 1: no update
  w2 = np.asarray(variables["params"]["relationship"]["layer0"]["kernel"], np.float64) / 1.1
  for key, value in zip(("cov_in", "cov_out", "cov_task"),
                        _numpy_flip_flop(w2.transpose(1, 2, 0), [before2["layer0"][k] for k in covs],
                                         0.05)):
    np.testing.assert_allclose(after2["layer0"][key], value, rtol=1e-4, atol=1e-6)
  assert [int(h[1]["count"]) for h in history] == [1, 2, 3]


def test_relationship_features_heads_split():
  module = archs.build("relationship", TWO, MLP, dict(task_layers=2))
  variables = fake_variables(module)
  assert variables["params"]["relationship"]["layer1"]["kernel"].shape == (2, 6, 6)

  @jit
  def run(v):
    z, _ = module.apply(v, X, method="features")
    return z, module.apply(v, z, method="heads"), module.apply(v, X)
  z, (from_z, penalty_z), (whole, penalty) = run(variables)
  assert z.shape == (4, 6)
  assert_outputs_close(from_z, whole, atol=0)
  assert float(penalty_z["relationship"]) == float(penalty["relationship"])


# ---------------------------------------------------------------------------------- low supervision

@pytest.mark.parametrize("shortcut", ["probs", "embedding"])
def test_low_supervision_depths_shortcuts_and_gradients(shortcut):
  tasks = (Task("low", "multiclass", "low", 3, depth=1), Task("high", "regression", "high", 2))
  module = archs.build("low_supervision", tasks, CNN, dict(shortcut=shortcut, embedding_dim=5))
  variables = fake_variables(module)
  head_in = variables["params"]["heads"]["high"]["kernel"].shape[0]
  assert head_in == 8 + (3 if shortcut == "probs" else 5)  # stage-2 width + the low task's shortcut
  assert variables["params"]["heads"]["low"]["kernel"].shape == (4, 3)  # stage-1 width, no shortcut

  def output(params, name):
    return module.apply({**variables, "params": params}, X)[0][name].sum()

  @jit
  def run(params):
    z, _ = module.apply({**variables, "params": params}, X, method="features")
    return (jax.grad(output)(params, "low"), z, module.apply({**variables, "params": params}, z,
                                                              method="heads")[0],
            module.apply({**variables, "params": params}, X)[0])
  grads, z, from_z, whole = run(variables["params"])
  assert set(z) == {"stage1", "stage2"}
  assert_outputs_close(from_z, whole, atol=0)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["backbone"]["stage2"]))
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads["backbone"]["stage1"]))
  # The high task reads the low task's prediction: changing the low head changes it.
  nudged = jax.tree.map(lambda p: p, variables["params"])
  nudged["heads"]["low"]["bias"] = nudged["heads"]["low"]["bias"] + np.float32([1.0, 0.0, 0.0])
  assert not np.allclose(run(nudged)[3]["high"], whole["high"])
  prefixes = archs.shared_prefixes(tasks, CNN)
  assert prefixes == {"low": ("params/backbone/stage1",),
                      "high": ("params/backbone/stage1", "params/backbone/stage2")}
  with pytest.raises(ConfigError, match=r"depth 3 .*tasks\.low\.depth"):
    archs.build("low_supervision", (Task("low", "binary", "low", 1, depth=3),), CNN, {})


# ----------------------------------------------------------------------------------------- adaptive

def _stage_of(name, trunk):
  return next(k for k in range(1, trunk.num_stages + 1) if name in trunk.stage_prefixes(k))


def test_adaptive_one_group_equals_hard_and_widening_preserves_the_function():
  tasks = TWO + (Task("c", "binary", "c", 1),)
  hard = archs.build("hard", tasks, CNN, {})
  hard_variables = fake_variables(hard)
  trunk = stages.staged(CNN)
  thin = archs.build("adaptive", tasks, CNN, {})
  assert thin.branches == ((("a", "b", "c"),), (("a", "b", "c"),))
  mapped = {c: {"branches": {f"stage{k}": {"a+b+c": {}} for k in (1, 2)}} for c in hard_variables}
  for c, tree in hard_variables.items():
    for name, sub in tree["backbone"].items():
      mapped[c]["branches"][f"stage{_stage_of(name, trunk)}"]["a+b+c"][name] = sub
  mapped["params"]["heads"] = hard_variables["params"]["heads"]
  assert jax.tree.structure(fake_variables(thin)) == jax.tree.structure(mapped)
  outputs, hard_outputs = jit(lambda v, h: (thin.apply(v, X)[0], hard.apply(h, X)[0]))(
      mapped, hard_variables)
  assert_outputs_close(outputs, hard_outputs)
  # Widen the top stage into (a, b) and (c): same function, new branches copied from the parent.
  split = ((("a", "b", "c"),), (("a", "b"), ("c",)))
  wide = archs.build("adaptive", tasks, CNN, dict(branches=split))
  widened = {"params": adaptive.widen(mapped["params"], thin.branches, split),
             **adaptive.widen({"batch_stats": mapped["batch_stats"]}, thin.branches, split)}
  assert jax.tree.structure(fake_variables(wide)) == jax.tree.structure(widened)
  top = widened["params"]["branches"]["stage2"]
  for group in ("a+b", "c"):
    jax.tree.map(np.testing.assert_array_equal, top[group],
                 mapped["params"]["branches"]["stage2"]["a+b+c"])
  jax.tree.map(np.testing.assert_array_equal, widened["params"]["heads"], mapped["params"]["heads"])
  assert_outputs_close(jit(lambda v: wide.apply(v, X)[0])(widened), outputs)
  with pytest.raises(ConfigError, match="straddles"):
    archs.build("adaptive", tasks, CNN, dict(branches=(split[1], split[0])))
  with pytest.raises(ConfigError, match="only splits"):
    adaptive.widen(mapped["params"], split, thin.branches)


def test_task_affinity_on_constructed_errors():
  # Task 0 and 1 agree on every example, task 2 is their opposite, task 3 agrees on half.
  easy_hard = np.array([0, 0, 1, 1], np.float64)
  errors = np.stack([easy_hard, 2 * easy_hard + 1, 1 - easy_hard, np.array([0, 1, 0, 1.0])], axis=1)
  affinity = adaptive.task_affinity(errors)
  np.testing.assert_allclose(affinity, [[1, 1, 0, .5], [1, 1, 0, .5], [0, 0, 1, .5], [.5, .5, .5, 1]])
  # The threshold: mean (Lu et al.) or median; one outlier moves the mean, not the median.
  errors = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [100.0, 3.0]])
  np.testing.assert_allclose(adaptive.task_affinity(errors, "mean")[0, 1], 0.75)
  np.testing.assert_allclose(adaptive.task_affinity(errors, "median")[0, 1], 1.0)


def test_split_top_clusters_by_average_linkage_top_down():
  names = ("a", "b", "c", "d")
  affinity = np.array([[1, .9, .2, .3], [.9, 1, .1, .2], [.2, .1, 1, .8], [.3, .2, .8, 1]])
  thin = ((names,),) * 3
  first = adaptive.split_top(thin, affinity, 2)
  assert first == ((names,), (names,), (("a", "b"), ("c", "d")))
  second = adaptive.split_top(first, affinity, 1)  # junction at stage 2: one cluster, no split
  assert second == first
  third = adaptive.split_top(first, affinity, 3)  # stage 2's children are the two top groups
  assert third == ((names,), (("a", "b"), ("c", "d")), (("a", "b"), ("c", "d")))
  # Four tasks into three groups: the most affine pair (a, b) merges first.
  assert adaptive.split_top(((names,),), affinity, 3) == ((("a", "b"), ("c",), ("d",)),)
  # Average linkage decides the next merge: with affinity(b, d) raised to .95 the pair (b, d)
  # merges first, then a joins (b, d) (mean .6) rather than c (.2 + .8 + .3) / 3 < .6.
  linked = affinity.copy()
  linked[1, 3] = linked[3, 1] = 0.95
  assert adaptive.split_top(((names,),), linked, 2) == ((("a", "b", "d"), ("c",)),)
  two_of_four = adaptive.split_top(((("d", "c", "b", "a"),),), affinity, 2, task_names=names)
  assert two_of_four == ((("a", "b"), ("c", "d")),)
  singles = ((("a",), ("b",), ("c",), ("d",)),)
  assert adaptive.split_top(singles, affinity, 2) == singles


# --------------------------------------------------------------------------------- options, errors

def test_options_and_config_errors():
  assert set(archs.ARCHS) == {"hard", "soft_l2", "soft_trace", "cross_stitch", "sluice",
                              "relationship", "low_supervision", "adaptive"}
  assert archs.arch_options("hard") == {}
  assert archs.arch_options("sluice")["subspaces"] == 2
  with pytest.raises(ConfigError, match=r"did you mean 'sluice'.*--config\.multitask\.arch"):
    archs.build("sluise", TWO, MLP, {})
  with pytest.raises(ConfigError, match=r"did you mean 'weight'.*arch_options"):
    archs.build("soft_l2", TWO, MLP, dict(wieght=1.0))
  with pytest.raises(ConfigError, match=r"arch_options\.weight"):
    archs.build("soft_trace", TWO, MLP, dict(weight=-1.0))
  with pytest.raises(ConfigError, match=r"arch_options\.eps"):
    archs.build("relationship", TWO, MLP, dict(eps=0.0))
  with pytest.raises(ConfigError, match=r"arch_options\.shortcut"):
    archs.build("low_supervision", TWO, MLP, dict(shortcut="logits"))
  with pytest.raises(ConfigError, match=r"arch_options\.branches"):
    archs.build("adaptive", TWO, MLP, dict(branches=((("a",),), (("a", "b"),))))
  # None takes the default, so options left from another arch's config can be dropped.
  module = archs.build("sluice", TWO, MLP, dict(subspaces=None, weight=None))
  assert module.subspaces == 2 and module.weight == 1e-3
  errors = []
  for arch, options in [("sluice", dict(subspaces=0)), ("cross_stitch", dict(init_diagonal=1.5))]:
    with pytest.raises(ConfigError) as info:
      archs.build(arch, TWO, MLP, options)
    errors.append(str(info.value))
  assert all("\n" not in e and "--config.multitask.arch_options." in e for e in errors)
