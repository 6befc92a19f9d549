"""Unsupervised domain adaptation: DANN (`objective="dann"`), Deep CORAL (`"coral"`) and MMD (`"mmd"`).

Labelled source, unlabelled target: the batch is `{'source': {'image', 'label'}, 'target': {'image',
...}}` from `config.data.mixture = {'source': dict(name=...), 'target': dict(name=...)}`. The training
loss reads `batch['target']['image']` and nothing else of the target: target labels may be in the data
(they are, for the embedded digits) but never reach the loss or the train metrics (tested by
scrambling them).

Model: a registry `Classifier` (`config.model`): `params/backbone/...` is the feature extractor and
`params/head/...` the label classifier, with exactly a supervised run's paths, so an adapted
checkpoint is the `init_from` of any transfer run (the extra `params/domain_classifier` is reported as
unexpected and ignored there). Source and target images go through the backbone as one batch, so
BatchNorm normalises with statistics of both domains, in training and in its running averages.

Losses, on the backbone's pooled features f (`jtl.losses.domain`), added to the source cross-entropy:
* dann: Ganin et al. 2016 ("Domain-Adversarial Training of Neural Networks", JMLR). A domain
  classifier (MLP `params/domain_classifier`, `domain.hidden`, one logit: target vs source) reads
  f through the gradient reversal layer and minimises the binary cross-entropy of the domain labels,
  while the backbone receives -lambda_p times that gradient: one loss, CE_s + BCE_d, one backward pass.
  lambda_p = weight * (2 / (1 + exp(-gamma p)) - 1) with p = step / config.total_steps, the
  trainer's optimizer step (`Step.step`: once per step whatever `grad_accum_steps`, checkpointed, so
  resume is exact); `model_state/domain/step` holds step + 1 for inspection (and is the step of a
  direct call to `loss` without a `Step`).
* coral: Sun & Saenko 2016, weight * ||C_s - C_t||_F^2 / (4 d^2) (eq. 1).
* mmd: weight * squared multi-kernel Gaussian MMD (Gretton et al. 2012; Long et al. 2015), estimator
  `domain.mmd_estimator` ('biased' V-statistic by default: >= 0 and exactly 0 for equal batches;
  'unbiased' U-statistic), bandwidths `mmd_multipliers` x the batch's mean squared distance.
`domain.weight = 0` is the source-only baseline: the target batch is then not used at all (not even
for BatchNorm statistics), so the run is plain supervised training on the source; with
`domain.target_batchnorm=True` the target still goes through the backbone (BatchNorm statistics of
both domains, as in the adapting runs) but adds nothing to the loss.

Metrics: train `source_ce`, `source_accuracy` and the method's term (`domain_loss`,
`domain_accuracy`, `lambda` for dann; `coral` or `mmd`). Eval, per example: `<member>/accuracy` and
`<member>/loss` for each member of an evaluated mixture (`test/target/accuracy` is the adapted
accuracy), plain `accuracy`/`loss` for a plain batch; dann adds `<member>/domain_accuracy`.
"""
from __future__ import annotations

from collections.abc import Sequence
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jtl import losses, models
from jtl import config as config_lib
from jtl.errors import ConfigError
from jtl.losses import domain as domain_losses
from jtl.objectives import labels
from jtl.objectives.base import Metrics, Objective, PyTree, apply_model, step_or_counter

METHODS = ("dann", "coral", "mmd")
DOMAINS = ("source", "target")
_OWN_STATE = "domain"  # model_state entry of the objective itself (not a flax collection)


def default_config() -> ml_collections.ConfigDict:
  """`config.domain`: every option, with defaults for the 8x8 digits."""
  return ml_collections.ConfigDict(dict(
      weight=1.0,  # dann: the largest lambda; coral/mmd: the loss weight; 0: source only
      gamma=10.0,  # dann: steepness of the lambda_p schedule (Ganin et al.: 10)
      hidden=(64, 64),  # dann: widths of the domain classifier's hidden layers (relu)
      mmd_estimator="biased",  # mmd: 'biased' (V-statistic) or 'unbiased' (U-statistic)
      mmd_multipliers=domain_losses.DEFAULT_MMD_MULTIPLIERS,  # mmd: bandwidths / mean sq. distance
      # weight 0 only: still forward the target batch (BatchNorm statistics of both domains, as
      # AdaBN, Li et al. 2016), its loss still the source CE alone; separates the two effects.
      target_batchnorm=False,
  ))


class DomainClassifier(nn.Module):
  """Dense layers `dense{i}` with relu, then `logit` (one output): P(target | features)."""
  hidden: Sequence[int] = (64, 64)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
    return nn.Dense(1, name="logit")(x)[:, 0]


def _features_and_logits(module: nn.Module, x: jnp.ndarray, train: bool = False
                         ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One backbone pass of a `Classifier`, giving both its pooled features and its logits."""
  features = module.features(x, train)
  return features, module.head(features).astype(jnp.float32)


class DomainAdaptation(Objective):
  """Source cross-entropy plus a domain-alignment term (`method`: dann, coral or mmd)."""

  def __init__(self, model: nn.Module, method: str, *, weight: float = 1.0, gamma: float = 10.0,
               hidden: Sequence[int] = (64, 64), total_steps: int = 1,
               mmd_estimator: str = "biased",
               mmd_multipliers: Sequence[float] = domain_losses.DEFAULT_MMD_MULTIPLIERS,
               target_batchnorm: bool = False):
    if method not in METHODS:
      raise ConfigError(f"unknown domain adaptation method {method!r}; choose one of {METHODS}")
    self.model, self.method = model, method
    self.weight, self.gamma = float(weight), float(gamma)
    self.total_steps = int(total_steps)
    self.mmd_estimator, self.mmd_multipliers = mmd_estimator, tuple(mmd_multipliers)
    # Whether the target batch goes through the model at all.
    self.forward_target = self.weight > 0 or bool(target_batchnorm)
    self.domain_classifier = DomainClassifier(tuple(hidden)) if method == "dann" else None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, method: str = "dann"
                  ) -> "DomainAdaptation":
    """Validates `config.domain` and the mixture's members; builds the objective for `method`."""
    o = config_lib.section_options(config, "domain", default_config())
    config_lib.check_number(o["weight"], "domain.weight", low=0.0)
    config_lib.check_number(o["gamma"], "domain.gamma", low=0.0, low_open=True)
    for width in tuple(o["hidden"] or ()):
      config_lib.check_positive_int(width, "domain.hidden")
    if o["mmd_estimator"] not in domain_losses.MMD_ESTIMATORS:
      raise ConfigError(f"unknown domain.mmd_estimator {o['mmd_estimator']!r}; choose one of "
                        f"{domain_losses.MMD_ESTIMATORS} (--config.domain.mmd_estimator)")
    multipliers = tuple(o["mmd_multipliers"] or ())
    if not multipliers:
      raise ConfigError("domain.mmd_multipliers is empty; give at least one bandwidth multiplier")
    for m in multipliers:
      config_lib.check_number(m, "domain.mmd_multipliers", low=0.0, low_open=True)
    if not isinstance(o["target_batchnorm"], bool):
      raise ConfigError(f"domain.target_batchnorm must be True or False, got "
                        f"{o['target_batchnorm']!r}")
    members = set(dict(config.data.get("mixture") or {}))
    needed = {"source"} if o["weight"] == 0 and not o["target_batchnorm"] else set(DOMAINS)
    if not needed <= members:
      raise ConfigError(f"{method} needs data.mixture members {sorted(needed)}, got "
                        f"{sorted(members)}; set --config.data.mixture.source.name=... and "
                        "--config.data.mixture.target.name=...")
    model = models.build(config.model)
    if not getattr(model, "num_classes", None):
      raise ConfigError("domain adaptation needs a label classifier: set --config.model.num_classes")
    labels.check_head_fits_labels(config, model.num_classes, members=("source",))
    return cls(model, method, weight=o["weight"], gamma=o["gamma"], hidden=tuple(o["hidden"] or ()),
               total_steps=config.total_steps, mmd_estimator=o["mmd_estimator"],
               mmd_multipliers=multipliers, target_batchnorm=o["target_batchnorm"])

  @property
  def source_only(self) -> bool:
    return self.weight == 0.0

  # --- variables -------------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree]:
    images = batch["source"]["image"] if "source" in batch else batch["image"]
    variables = self.model.init(rng, jnp.zeros_like(images[:1]), train=False)
    params = dict(variables.pop("params"))
    model_state = dict(variables)
    if self.domain_classifier is not None:
      features = jax.eval_shape(lambda: self.model.apply(
          {"params": params, **model_state}, jnp.zeros_like(images[:1]), method="features"))
      params["domain_classifier"] = self.domain_classifier.init(
          jax.random.fold_in(rng, 1), jnp.zeros(features.shape, jnp.float32))["params"]
      model_state[_OWN_STATE] = {"step": jnp.zeros((), jnp.int32)}
    return params, model_state

  @staticmethod
  def _split(tree: PyTree) -> tuple[PyTree, PyTree]:
    """(the Classifier's part, the rest) of params, model_state or a mask."""
    own = ("domain_classifier", _OWN_STATE)
    return ({k: v for k, v in tree.items() if k not in own},
            {k: v for k, v in tree.items() if k in own})

  def _classify(self, params, model_state, images, *, train, trainable=None, rng=None):
    """(features, logits, new flax state) of the Classifier."""
    cls_params, _ = self._split(params)
    cls_state, own_state = self._split(model_state)
    cls_mask = self._split(trainable)[0] if trainable is not None else None
    (features, logits), new_state = apply_model(self.model, cls_params, cls_state, images,
                                                train=train, trainable=cls_mask, rng=rng,
                                                method=_features_and_logits)
    return features, logits, {**new_state, **own_state}

  def _domain_logits(self, params: PyTree, features: jax.Array) -> jax.Array:
    return self.domain_classifier.apply({"params": params["domain_classifier"]}, features)

  # --- training --------------------------------------------------------------------------------

  def loss(self, params, model_state, batch, rng, *, trainable, step=None):
    source = batch["source"]
    n_source = source["image"].shape[0]
    if not self.forward_target:
      images = source["image"]
    else:  # the target's image only: its labels never enter the loss
      images = jnp.concatenate([source["image"], batch["target"]["image"]])
    features, logits, new_state = self._classify(params, model_state, images, train=True,
                                                 trainable=trainable, rng=rng)
    ce = jnp.mean(losses.softmax_cross_entropy(logits[:n_source], source["label"]))
    metrics = {"source_ce": ce,
               "source_accuracy": jnp.mean(losses.accuracy(logits[:n_source], source["label"]))}
    if self.source_only:
      return ce, (new_state, metrics)
    f_source, f_target = features[:n_source], features[n_source:]
    if self.method == "coral":
      term = domain_losses.coral(f_source, f_target)
      metrics["coral"] = term
      return ce + self.weight * term, (new_state, metrics)
    if self.method == "mmd":
      term = domain_losses.mmd(f_source, f_target, estimator=self.mmd_estimator,
                               multipliers=self.mmd_multipliers)
      metrics["mmd"] = term
      return ce + self.weight * term, (new_state, metrics)
    # The optimizer step, never a count of calls: with grad_accum_steps = k the objective is called
    # k times per step (jtl/objectives/base.py, "One optimizer step").
    current = step_or_counter(step, model_state[_OWN_STATE]["step"])
    lam = self.weight * domain_losses.dann_lambda(current / self.total_steps, self.gamma)
    domain_logits = self._domain_logits(params, domain_losses.gradient_reversal(features, lam))
    is_target = (jnp.arange(images.shape[0]) >= n_source).astype(jnp.float32)
    domain_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(domain_logits, is_target))
    new_state[_OWN_STATE] = {"step": current + 1}
    metrics.update({"domain_loss": domain_loss, "lambda": lam, "domain_accuracy": jnp.mean(
        ((domain_logits > 0) == (is_target > 0.5)).astype(jnp.float32))})
    return ce + domain_loss, (new_state, metrics)

  # --- evaluation ------------------------------------------------------------------------------

  def eval_metrics(self, params, model_state, batch) -> Metrics:
    parts = [(None, batch)] if "image" in batch else [(name, batch[name]) for name in sorted(batch)]
    out = {}
    for name, part in parts:
      features, logits, _ = self._classify(params, model_state, part["image"], train=False)
      prefix = f"{name}/" if name else ""
      out[f"{prefix}loss"] = losses.softmax_cross_entropy(logits, part["label"])
      out[f"{prefix}accuracy"] = losses.accuracy(logits, part["label"])
      if self.domain_classifier is not None and name in DOMAINS:
        said_target = self._domain_logits(params, features) > 0
        out[f"{prefix}domain_accuracy"] = (said_target == (name == "target")).astype(jnp.float32)
    return out

  def features(self, params: PyTree, model_state: PyTree, images: jax.Array) -> jax.Array:
    """The backbone's pooled features [B, D] in inference mode."""
    features, _, _ = self._classify(params, model_state, images, train=False)
    return features


class DANN(DomainAdaptation):
  """`objective="dann"`: domain-adversarial training through a gradient reversal layer."""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, method: str = "dann") -> "DANN":
    return super().from_config(config, method="dann")


class CORAL(DomainAdaptation):
  """`objective="coral"`: Deep CORAL, covariance alignment of the features."""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, method: str = "coral") -> "CORAL":
    return super().from_config(config, method="coral")


class MMD(DomainAdaptation):
  """`objective="mmd"`: multi-kernel MMD between the domains' features."""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, method: str = "mmd") -> "MMD":
    return super().from_config(config, method="mmd")
