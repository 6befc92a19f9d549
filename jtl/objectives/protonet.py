"""Prototypical networks (Snell et al. 2017, "Prototypical Networks for Few-shot Learning").

On a batch of N-way K-shot episodes (`jtl.data.episodes`), an encoder f embeds support and query
images. The prototype of class n is the mean embedding of its support examples (eq. 1,
c_n = 1/|S_n| sum f(x_i)). A query's logits are the negative squared Euclidean distances to the
prototypes (eq. 2, the Bregman-divergence choice of Sec. 2.3). The loss is softmax cross-entropy
over the episode's queries (Algorithm 1), averaged over queries, then over the step's E episodes.

Conventions:
* The encoder is a registry model without a head (`models.build(config.model, num_classes=0)`).
  Its params are `params/backbone/...` and its BatchNorm statistics
  `model_state/batch_stats/backbone/...`, the paths of every other objective. So a ProtoNet
  checkpoint is the `init_from` of a transfer run, and any representation evaluator reads its
  `features`.
* BatchNorm in training uses the statistics of one episode, support and query together (the
  reference implementation forwards them as one batch): the per-episode forward runs under
  `jax.vmap` over the episode axis. The running statistics take the mean of the episodes'
  updates. Inference (`eval_metrics`, `features`) uses the running statistics.
* Distances are computed from differences, not as |q|^2 - 2 q.c + |c|^2, which cancels badly in
  float32 when embeddings are large and close.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jtl import losses, models
from jtl.data import episodes as episodes_lib
from jtl.errors import ConfigError
from jtl.objectives.base import Metrics, Objective, PyTree, apply_model


def prototypes(embeddings: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
  """[N, D]: the mean embedding of each class's support examples (eq. 1); labels in 0..N-1."""
  one_hot = jax.nn.one_hot(labels, ways, dtype=embeddings.dtype)  # [S, N]
  counts = jnp.maximum(one_hot.sum(axis=0), 1.0)
  return (one_hot.T @ embeddings) / counts[:, None]


def squared_distances(queries: jax.Array, centres: jax.Array) -> jax.Array:
  """[Q, N]: |q - c|^2 for every query and centre, from the differences."""
  return jnp.sum(jnp.square(queries[:, None, :] - centres[None, :, :]), axis=-1)


def prototypical_logits(support: jax.Array, support_labels: jax.Array, queries: jax.Array,
                        ways: int) -> jax.Array:
  """[Q, N]: query logits -|f(x) - c_n|^2 against the support prototypes (eq. 2)."""
  return -squared_distances(queries, prototypes(support, support_labels, ways))


def prototypical_loss(support: jax.Array, support_labels: jax.Array, queries: jax.Array,
                      query_labels: jax.Array, ways: int) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, mean accuracy) over one episode's queries, from embeddings."""
  logits = prototypical_logits(support, support_labels, queries, ways)
  return (losses.softmax_cross_entropy(logits, query_labels).mean(),
          losses.accuracy(logits, query_labels).mean())


def mean_over_episodes(tree: PyTree) -> PyTree:
  """Each leaf averaged over its leading (episode) axis: the step's update of running statistics."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), tree)


def require_episodes(batch: PyTree, objective: str) -> None:
  """A clear error, at trace time, when an episodic objective is given a plain batch."""
  if not isinstance(batch, dict) or "support" not in batch or "query" not in batch:
    raise ConfigError(f"objective {objective!r} works on episodes ({{'support', 'query'}} "
                      "batches); evaluate it with an evaluator of type 'episodic' in config.evals")


class ProtoNet(Objective):
  """Prototypical-network loss on N-way episodes; `features` is the encoder in inference mode."""

  def __init__(self, model: nn.Module, ways: int):
    self.model = model
    self.ways = ways

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ProtoNet":
    spec = episodes_lib.episode_spec(config.data)
    if spec.ways == 0:
      raise ConfigError("objective 'protonet' trains on episodes; set --config.data.episodes.ways "
                        "(e.g. 5)")
    return cls(models.build(config.model, num_classes=0), spec.ways)

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    require_episodes(batch, "protonet")
    image = jnp.zeros_like(batch["support"]["image"][0, :1])
    variables = self.model.init(rng, image, train=False)
    params = variables.pop("params")
    return params, dict(variables)

  def embed(self, params: PyTree, model_state: PyTree, images: jax.Array, *, train: bool,
            trainable: PyTree | None = None) -> tuple[jax.Array, PyTree]:
    """(embeddings [B, D], new model_state) of one batch of images."""
    return apply_model(self.model, params, model_state, images, train=train, trainable=trainable,
                       method="features")

  def episode_loss(self, params: PyTree, model_state: PyTree, episode: PyTree, *, train: bool,
                   trainable: PyTree | None = None) -> tuple[jax.Array, jax.Array, PyTree]:
    """(loss, accuracy, new model_state) of one episode; support and query share one forward."""
    support, query = episode["support"], episode["query"]
    num_support = support["image"].shape[0]
    images = jnp.concatenate([support["image"], query["image"]])
    embeddings, model_state = self.embed(params, model_state, images, train=train,
                                         trainable=trainable)
    loss, accuracy = prototypical_loss(embeddings[:num_support], support["label"],
                                       embeddings[num_support:], query["label"], self.ways)
    return loss, accuracy, model_state

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    del rng  # no randomness: the episodes are the sample
    require_episodes(batch, "protonet")

    def one(episode):
      return self.episode_loss(params, model_state, episode, train=True, trainable=trainable)

    losses_, accuracies, states = jax.vmap(one)(batch)
    return losses_.mean(), (mean_over_episodes(states), {"accuracy": accuracies.mean()})

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    """Per-episode `loss` and `accuracy` [E] in inference mode (running BatchNorm statistics)."""
    require_episodes(batch, "protonet")

    def one(episode):
      loss, accuracy, _ = self.episode_loss(params, model_state, episode, train=False)
      return {"loss": loss, "accuracy": accuracy}

    return jax.vmap(one)(batch)

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """Encoder features [B, D] in inference mode (what the episodic and representation evaluators
    read)."""
    return self.embed(params, model_state, images, train=False)[0]
