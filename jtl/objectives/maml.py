"""MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks").

On a batch of N-way K-shot episodes (`jtl.data.episodes`), for each episode (task T_i):
  inner loop (eq. 1), `inner_steps` SGD steps of size alpha = `inner_lr` on the support loss:
      theta'_{j+1} = theta'_j - alpha * grad L_S(theta'_j),   theta'_0 = theta;
  outer loss (eq. 2 / Algorithm 2, line 10): L_Q(theta') on the query set after adaptation, averaged
  over the E episodes of the step (`jax.vmap` over the episode axis).
The trainer differentiates the outer loss with respect to theta. That is the full second-order
gradient, prod_j (I - alpha * H_S(theta'_j)) grad L_Q(theta'), because `jax.grad` runs through the
inner `jax.lax.scan`. With `first_order=True` (FOMAML, Sec. 5.2) the inner gradients pass through
`jax.lax.stop_gradient`: each Jacobian d theta'_{j+1} / d theta'_j becomes I, and the meta-gradient
is grad L_Q(theta') exactly, without the Hessian terms.

Conventions:
* The model is a registry `Classifier` (`params/backbone/...` + an N-way `params/head/...`, so
  `config.model.num_classes` must equal `data.episodes.ways`). Labels are episode-local, so the head
  has no fixed class meaning. The default zero-initialised head starts every task at uniform
  predictions.
* Which leaves adapt in the inner loop is a rule table, `config.maml.inner_trainable`, matched with
  `jtl.masks.trainable_mask` over `params/...` paths: `((".*", True),)` is MAML, and
  `(("params/head/.*", True), (".*", False))` is ANIL (Raghu et al. 2020: only the head adapts;
  the backbone is still meta-learned in the outer loop). The trainer's own `config.trainable` mask
  still decides what the *outer* loop updates.
* BatchNorm uses the batch statistics of the data at hand in every inner step (the support set) and
  in the query pass. So statistics are per task, as in the MAML reference implementation, which
  also does this at test time (transductively over the query set). Inner-loop statistic updates are
  discarded. The running statistics in `model_state` take the mean over episodes of the query pass's
  update, so a MAML checkpoint still has inference-mode statistics for `features` and transfer.
  In training, BatchNorms that the outer mask freezes use and keep their running statistics.
* Evaluation (`eval_metrics`, `episode_accuracy`) adapts on each episode's support set for
  `eval_inner_steps` steps (default `inner_steps`), then scores its queries. Adaptation runs in
  training mode (batch statistics, see above), for every BatchNorm: evaluation does not know the
  trainer's mask. A model with dropout > 0 would also drop units there, with a fixed key; the
  registry's small models have no dropout.
* Cost: under `vmap`, adapted weights differ per episode, so each convolution becomes a grouped
  convolution over the episodes; sharded over devices, each device runs its own episodes' plain
  convolutions. The second-order step costs about 1.4x FOMAML's on the digits (CPU).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jtl import losses, masks, models
from jtl.config import check_number, check_positive_int, section_options as config_section
from jtl.data import episodes as episodes_lib
from jtl.errors import ConfigError
from jtl.objectives.base import Metrics, Objective, PyTree, apply_model
from jtl.objectives.protonet import mean_over_episodes, require_episodes

ANIL = (("params/head/.*", True), (".*", False))


def default_config() -> ml_collections.ConfigDict:
  """`config.maml`: every option, with defaults for the 8x8 digits."""
  return ml_collections.ConfigDict(dict(
      inner_steps=5,  # SGD steps on the support loss per episode (Finn et al.: 1-10)
      inner_lr=0.1,  # alpha, the inner step size
      first_order=False,  # True: FOMAML, stop_gradient on the inner gradients
      inner_trainable=((".*", True),),  # which params adapt in the inner loop; ANIL: head only
      eval_inner_steps=config_dict.placeholder(int),  # inner steps at evaluation; None: inner_steps
  ))


def adapt(support_loss: Callable[[PyTree, jax.Array], jax.Array], fast: PyTree, *, steps: int,
          lr: float, first_order: bool = False) -> PyTree:
  """`steps` SGD steps of size `lr` on `support_loss(fast, step_index)`, under `jax.lax.scan`.

  Differentiable with respect to `fast` (second order). With `first_order` the inner gradients are
  constants to the outer derivative (FOMAML): d(result)/d(fast) is the identity.
  """
  def step(params, index):
    grads = jax.grad(support_loss)(params, index)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), None

  fast, _ = jax.lax.scan(step, fast, jnp.arange(steps))
  return fast


def section_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.maml` over `default_config()`, checked; unknown keys get a did-you-mean."""
  options = config_section(config, "maml", default_config())
  check_positive_int(options["inner_steps"], "maml.inner_steps", minimum=0)
  check_positive_int(options["eval_inner_steps"], "maml.eval_inner_steps", minimum=0,
                     allow_none=True)
  check_number(options["inner_lr"], "maml.inner_lr", low=0.0, low_open=True)
  if not isinstance(options["first_order"], bool):
    raise ConfigError(f"maml.first_order must be True or False, got {options['first_order']!r}; "
                      "set --config.maml.first_order")
  masks.compile_rules(options["inner_trainable"], "maml.inner_trainable rule")
  return options


class MAML(Objective):
  """MAML / FOMAML / ANIL on N-way episodes (module docstring)."""

  def __init__(self, model: nn.Module, ways: int, *, inner_steps: int = 5, inner_lr: float = 0.1,
               first_order: bool = False,
               inner_trainable: Sequence[tuple[str, bool]] | str = ((".*", True),),
               eval_inner_steps: int | None = None):
    self.model = model
    self.ways = ways
    self.inner_steps = inner_steps
    self.inner_lr = inner_lr
    self.first_order = first_order
    self.inner_trainable = inner_trainable
    self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "MAML":
    spec = episodes_lib.episode_spec(config.data)
    if spec.ways == 0:
      raise ConfigError("objective 'maml' trains on episodes; set --config.data.episodes.ways "
                        "(e.g. 5)")
    o = section_options(config)
    model = models.build(config.model)
    if getattr(model, "num_classes", None) != spec.ways:
      raise ConfigError(f"maml needs an N-way head: model.num_classes="
                        f"{getattr(model, 'num_classes', None)!r} but data.episodes.ways="
                        f"{spec.ways}; set --config.model.num_classes={spec.ways}")
    return cls(model, spec.ways, inner_steps=o["inner_steps"], inner_lr=float(o["inner_lr"]),
               first_order=o["first_order"], inner_trainable=o["inner_trainable"],
               eval_inner_steps=o["eval_inner_steps"])

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    require_episodes(batch, "maml")
    variables = self.model.init(rng, jnp.zeros_like(batch["support"]["image"][0, :1]), train=False)
    params = variables.pop("params")
    self.inner_mask(params)  # a pattern that matches nothing stops the run here, before compiling
    return params, dict(variables)

  def inner_mask(self, params: PyTree) -> PyTree:
    """Bool tree over params: True where a leaf adapts in the inner loop."""
    try:
      return masks.trainable_mask(params, self.inner_trainable)
    except ConfigError as e:
      raise ConfigError(f"maml.inner_trainable: {e}") from e

  def adapted_params(self, params: PyTree, model_state: PyTree, support: PyTree, rng: jax.Array, *,
                     steps: int, trainable: PyTree | None) -> PyTree:
    """params after `steps` inner SGD steps on one episode's support set."""
    fast, slow = masks.partition(params, self.inner_mask(params))
    loop_model = self.in_loop_body().model  # traced inside adapt's scan (cpu_ops: 8x on CPU)

    def support_loss(fast_params, index):
      logits, _ = apply_model(loop_model, masks.merge(fast_params, slow), model_state,
                              support["image"], train=True, trainable=trainable,
                              rng=jax.random.fold_in(rng, index))
      return losses.softmax_cross_entropy(logits, support["label"]).mean()

    fast = adapt(support_loss, fast, steps=steps, lr=self.inner_lr, first_order=self.first_order)
    return masks.merge(fast, slow)

  def episode_loss(self, params: PyTree, model_state: PyTree, episode: PyTree, rng: jax.Array, *,
                   steps: int, trainable: PyTree | None = None
                   ) -> tuple[jax.Array, jax.Array, PyTree]:
    """(query loss, query accuracy, model_state updated by the query pass) after adaptation."""
    inner_rng, outer_rng = jax.random.split(rng)
    adapted = self.adapted_params(params, model_state, episode["support"], inner_rng, steps=steps,
                                  trainable=trainable)
    logits, model_state = apply_model(self.model, adapted, model_state, episode["query"]["image"],
                                      train=True, trainable=trainable, rng=outer_rng)
    labels = episode["query"]["label"]
    return (losses.softmax_cross_entropy(logits, labels).mean(),
            losses.accuracy(logits, labels).mean(), model_state)

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    require_episodes(batch, "maml")
    num_episodes = batch["query"]["label"].shape[0]

    def one(episode, key):
      return self.episode_loss(params, model_state, episode, key, steps=self.inner_steps,
                               trainable=trainable)

    query_losses, accuracies, states = jax.vmap(one)(batch, jax.random.split(rng, num_episodes))
    return query_losses.mean(), (mean_over_episodes(states), {"accuracy": accuracies.mean()})

  def eval_metrics(self, params, model_state, batch, *, steps: int | None = None) -> Metrics:
    """Per-episode query `loss` and `accuracy` [E] after `steps` adaptation steps (None:
    `eval_inner_steps`)."""
    require_episodes(batch, "maml")
    num_episodes = batch["query"]["label"].shape[0]
    steps = self.eval_inner_steps if steps is None else steps

    def one(episode, key):
      loss, accuracy, _ = self.episode_loss(params, model_state, episode, key, steps=steps,
                                            trainable=None)
      return {"loss": loss, "accuracy": accuracy}

    return jax.vmap(one)(batch, jax.random.split(jax.random.key(0), num_episodes))

  def episode_accuracy(self, params: PyTree, model_state: PyTree, batch: PyTree, *,
                       steps: int | None = None) -> jax.Array:
    """[E]: query accuracy of each episode after adapting on its support set for `steps` inner
    steps (None: `eval_inner_steps`; the episodic evaluator's entry point and its `adapt_steps`)."""
    return self.eval_metrics(params, model_state, batch, steps=steps)["accuracy"]

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """The backbone's features [B, D] in inference mode (running statistics), without adaptation."""
    features, _ = apply_model(self.model, params, model_state, images, train=False,
                              method="features")
    return features
