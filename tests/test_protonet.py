"""Prototypical networks (jtl/objectives/protonet.py): the loss against a hand computation,
prototype invariances, per-episode wiring through a real encoder, and 8 devices == 1."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.special import logsumexp

from experiments.configs import protonet_digits
from jtl import data, models, train
from jtl.objectives import ProtoNet, protonet
from jtl.sharding import to_global

# Test-only jits at LLVM -O0: numbers, not speed (compiles several times faster on 2 cores).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _hand_loss(support, support_labels, queries, query_labels, ways):
  """Snell et al. eqs. 1-2 and the CE over queries, one loop at a time in float64."""
  support, queries = np.float64(support), np.float64(queries)
  protos = [support[support_labels == n].mean(axis=0) for n in range(ways)]
  total = 0.0
  for q, y in zip(queries, query_labels):
    logits = np.array([-np.sum((q - c) ** 2) for c in protos])
    total += logsumexp(logits) - logits[y]
  return total / len(queries)


def test_loss_equals_a_hand_computation_on_constructed_embeddings():
  rng = np.random.default_rng(0)
  ways, shots, queries, dim = 4, 3, 5, 7
  support_labels = rng.permutation(np.repeat(np.arange(ways), shots))  # any order, not class-major
  query_labels = rng.integers(0, ways, ways * queries)
  support = rng.normal(size=(ways * shots, dim)) + 0.5 * support_labels[:, None]
  query = rng.normal(size=(ways * queries, dim)) + 0.5 * query_labels[:, None]
  loss, accuracy = protonet.prototypical_loss(jnp.asarray(support, jnp.float32),
                                              jnp.asarray(support_labels),
                                              jnp.asarray(query, jnp.float32),
                                              jnp.asarray(query_labels), ways)
  np.testing.assert_allclose(loss, _hand_loss(support, support_labels, query, query_labels, ways),
                             rtol=1e-5)
  protos = np.stack([support[support_labels == n].mean(0) for n in range(ways)])
  nearest = np.argmin(((query[:, None] - protos[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(accuracy, np.mean(nearest == query_labels), rtol=1e-6)
  assert 0.1 < float(loss) < 10  # neither trivial nor saturated, so the comparison means something


def test_prototypes_are_permutation_invariant_within_a_class():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(3), 4)
  emb = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  query = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  query_labels = jnp.asarray(rng.integers(0, 3, 6))
  order = np.concatenate([rng.permutation(np.flatnonzero(labels == n)) for n in range(3)])
  shuffled = rng.permutation(12)  # across classes too, labels moving with their rows
  base = protonet.prototypes(emb, jnp.asarray(labels), 3)
  for perm in (order, shuffled):
    np.testing.assert_allclose(protonet.prototypes(emb[perm], jnp.asarray(labels[perm]), 3), base,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        protonet.prototypical_loss(emb[perm], jnp.asarray(labels[perm]), query, query_labels, 3)[0],
        protonet.prototypical_loss(emb, jnp.asarray(labels), query, query_labels, 3)[0], rtol=1e-6)
  # Moving a row to another class is not a symmetry: the test can tell prototypes apart.
  swapped = labels.copy()
  swapped[[0, 4]] = swapped[[4, 0]]
  assert not np.allclose(protonet.prototypes(emb, jnp.asarray(swapped), 3), base)


def test_objective_loss_is_the_mean_over_episodes_with_per_episode_batchnorm():
  """ProtoNet.loss through a real encoder with BatchNorm equals, per episode, the hand loss on
  features computed with that episode's own batch statistics (support and query in one forward)."""
  model = models.build(dict(name="mlp", num_classes=0, hidden=(6,), use_bn=True))
  objective = ProtoNet(model, ways=3)
  rng = np.random.default_rng(2)
  batch = {"support": {"image": rng.normal(size=(2, 6, 2, 2, 1)).astype(np.float32),
                       "label": np.tile(np.repeat(np.arange(3), 2), (2, 1))},
           "query": {"image": rng.normal(size=(2, 9, 2, 2, 1)).astype(np.float32),
                     "label": np.tile(np.repeat(np.arange(3), 3), (2, 1))}}
  params, model_state = jit(objective.init)(jax.random.key(0), batch)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), params)
  mask = jax.tree.map(lambda _: True, params)
  loss, (new_state, metrics) = jit(functools.partial(objective.loss, trainable=mask))(
      params, model_state, batch, jax.random.key(2))
  expected, means = [], []
  for e in range(2):
    images = np.concatenate([batch["support"]["image"][e], batch["query"]["image"][e]])
    feats, updates = model.apply({"params": params, **model_state}, jnp.asarray(images),
                                 train=True, method="features", mutable=["batch_stats"])
    feats = np.asarray(feats)
    expected.append(_hand_loss(feats[:6], batch["support"]["label"][e], feats[6:],
                               batch["query"]["label"][e], 3))
    means.append(updates["batch_stats"]["backbone"]["bn0"]["mean"])
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  np.testing.assert_allclose(new_state["batch_stats"]["backbone"]["bn0"]["mean"],
                             np.mean(means, axis=0), rtol=1e-5, atol=1e-7)
  per_episode = jit(objective.eval_metrics)(params, model_state, batch)
  assert per_episode["loss"].shape == per_episode["accuracy"].shape == (2,)


def _tiny_protonet_config(axes):
  config = protonet_digits.get_config("shots=1,queries=2")
  config.mesh.axes = axes
  config.batch_size = 8
  # A small MLP with BatchNorm: the per-episode statistics are exercised, and it compiles in a
  # fraction of the CNN's time on 2 cores.
  config.model = ml_collections.ConfigDict(dict(name="mlp", num_classes=0, hidden=(16,),
                                                use_bn=True))
  config.optim.warmup_steps = 0
  # SGD, not Adam: the MLP's dense bias before BatchNorm has a zero true gradient, and Adam would
  # blow its rounding noise (which differs between layouts) up to full-size steps.
  config.optim.name, config.optim.lr = "sgd", 0.1
  return config


def test_eight_device_step_equals_one_device_step():
  assert jax.device_count() == 8
  results = []
  for mesh_axes in ((("data", 8),), (("data", 1),)):
    config = _tiny_protonet_config(mesh_axes)
    batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    first = next(batches)
    s = train.setup(config, first)
    state = train.initial_state(s, *train.fresh_variables(s))
    step = train.make_train_step(s)
    for batch in itertools.chain([first], itertools.islice(batches, 2)):
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    results.append(jax.device_get((state.params, state.model_state, metrics["loss"])))
  assert set(results[0][0]) == {"backbone"}  # an encoder: params/backbone/..., as in transfer
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
