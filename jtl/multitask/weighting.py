"""Multitask loss weighting: turn the per-task losses `losses` [T] into one scalar to differentiate.

Each method is a small class built from keyword options (`WEIGHTINGS[name](**options)` or
`make_weighting(name, **options)`); an unknown option or a value out of range raises `ConfigError`.
The multitask objective calls

    params  = {..., "weighting": weighting.init_params(T)}     # learnable leaves, {} if none
    state   = {..., "weighting": weighting.init_state(T)}      # memory (model_state), {} if none
    total, new_state, metrics = weighting.total(losses, params=..., state=..., rng=..., step=...,
                                                grad_norms=...)

where `params` and `state` are the dicts that `init_params` / `init_state` returned, `losses` [T] are
differentiable batch-mean task losses and `grad_norms` [T] (only for `needs_grad_norms` methods) are the
per-task gradient norms w.r.t. the shared representation, taken as constants.

Conventions:
* Scale. Unless a method defines its own, the weights applied sum to T, so `equal` is the plain sum of
  the task losses and one learning rate is comparable across methods. `static` uses the user's weights as
  given; `uncertainty` is scaled by its likelihood (weights c_t exp(-s_t), c_t in {1/2, 1}).
* Gradients. Weights a method computes from losses or history are constants of the step
  (`stop_gradient`); only `uncertainty` differentiates through its weights, by design.
* Memory. Everything a method remembers is in `state`, including its own step counters, so a method
  never depends on the trainer's `step` (correct even when its state is fresh at a non-zero step).
* `total` is jit-compatible (static shapes, no Python branching on traced values) and float32-stable:
  losses are floored at `_LOSS_FLOOR` wherever they are divided by or logged.
* Metrics: `w_<t>`, the weight applied to task t at this step, plus method-specific scalars.

Methods and papers:
* `equal`: w = 1.   `static`: w = `weights`.
* `uncertainty`: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR
  2018, eq. 7 and 10, parameterised by s_t = log sigma_t^2.
* `dwa`: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. 7.
* `rlw`: Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022 (w = softmax(N(0, I))).
* `gradnorm`: Chen et al., "GradNorm", ICML 2018, eq. 1-2 (L_grad) and its renormalisation.
* `famo`: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, Algorithm 1.
"""
from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jtl.errors import ConfigError

State = dict[str, jax.Array]  # the params or state dict of one method
Metrics = dict[str, jax.Array]
Result = tuple[jax.Array, State, Metrics]  # (total, new_state, metrics)
_LOSS_FLOOR = 1e-8  # losses are divided by and logged in dwa/gradnorm/famo; keeps both finite
_MIN_WEIGHT = 1e-4  # gradnorm clips here before renormalising, so no task is switched off for good
_KINDS = {"regression": 0.5, "classification": 1.0}  # c_t of the uncertainty weighting


class Weighting:
  """Base class: equal weights, no parameters, no state. Subclasses override what they need."""

  name: ClassVar[str] = ""
  needs_grad_norms: ClassVar[bool] = False

  @classmethod
  def options(cls) -> dict[str, Any]:
    """The method's options and their defaults."""
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}

  def _reject_unknown(self, unknown: dict[str, Any]) -> None:
    if not unknown:
      return
    valid = list(self.options())
    key = sorted(unknown)[0]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown option {key!r} for loss weighting {self.name!r}{hint}; valid options: "
                      f"{', '.join(valid) if valid else 'none'}")

  def _option_error(self, option: str, value: Any, requirement: str) -> ConfigError:
    return ConfigError(f"loss weighting {self.name!r}: option {option}={value!r} is invalid, it must be "
                       f"{requirement}; valid options: {', '.join(self.options())}")

  def _number(self, option: str, value: Any, *, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
      raise self._option_error(option, value, "a finite number " + ("> 0" if positive else ">= 0"))
    return float(value)

  def _check_num_tasks(self, num_tasks: int) -> None:
    if not isinstance(num_tasks, int) or num_tasks < 1:
      raise ConfigError(f"loss weighting {self.name!r} needs num_tasks >= 1, got {num_tasks!r}")

  def init_params(self, num_tasks: int) -> State:
    """Learnable leaves of the method, to sit in `params` ({} if none)."""
    self._check_num_tasks(num_tasks)
    return {}

  def init_state(self, num_tasks: int) -> State:
    """Non-learned memory of the method, to sit in `model_state` ({} if none)."""
    self._check_num_tasks(num_tasks)
    return {}

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    """The weighted scalar loss, the new state and metrics (`w_<t>` and method-specific scalars)."""
    weights = jnp.ones(_num_tasks(losses), jnp.float32)
    return _weighted(weights, losses), state, _weight_metrics(weights)


def _num_tasks(losses: jax.Array) -> int:
  if losses.ndim != 1:
    raise ValueError(f"losses must be a vector [T] of per-task losses, got shape {losses.shape}")
  return losses.shape[0]


def _weighted(weights: jax.Array, losses: jax.Array) -> jax.Array:
  """sum_t w_t L_t with w a constant of the step."""
  return jnp.sum(jax.lax.stop_gradient(weights) * losses.astype(jnp.float32))


def _weight_metrics(weights: jax.Array) -> Metrics:
  weights = jax.lax.stop_gradient(weights)
  return {f"w_{t}": weights[t] for t in range(weights.shape[0])}


def _constant_losses(losses: jax.Array) -> jax.Array:
  """The losses as positive float32 constants, for history and ratios."""
  return jnp.maximum(jax.lax.stop_gradient(losses).astype(jnp.float32), _LOSS_FLOOR)


class Equal(Weighting):
  """w_t = 1: the plain sum of the task losses."""

  name = "equal"

  def __init__(self, **unknown: Any) -> None:
    self._reject_unknown(unknown)


class Static(Weighting):
  """Fixed user weights, applied as given (their scale is the user's; not renormalised to T)."""

  name = "static"

  def __init__(self, *, weights: Sequence[float] = (), **unknown: Any) -> None:
    self._reject_unknown(unknown)
    if not isinstance(weights, (list, tuple)) or not weights:
      raise self._option_error("weights", weights, "a tuple of T positive floats, one per task")
    self.weights = tuple(self._number("weights", w) for w in weights)

  def _check_num_tasks(self, num_tasks: int) -> None:
    super()._check_num_tasks(num_tasks)
    if len(self.weights) != num_tasks:
      raise ConfigError(f"loss weighting 'static' has {len(self.weights)} weights for {num_tasks} "
                        "tasks; give one weight per task in option weights")

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    self._check_num_tasks(_num_tasks(losses))
    weights = jnp.asarray(self.weights, jnp.float32)
    return _weighted(weights, losses), state, _weight_metrics(weights)


class Uncertainty(Weighting):
  """Homoscedastic uncertainty weighting (Kendall et al. 2018) with learnable s_t = log sigma_t^2.

  total = sum_t c_t exp(-s_t) L_t + s_t / 2, with c_t = 1/2 for a regression task (Gaussian
  likelihood, eq. 7: L / (2 sigma^2) + log sigma) and c_t = 1 for a classification task (scaled softmax,
  eq. 10: L / sigma^2 + log sigma). Learning s = log sigma^2 rather than sigma keeps the variance
  positive without a constraint and has no division by a variance that could reach 0, as the paper
  recommends; s = 0 (sigma = 1) at init gives total = sum_t c_t L_t. The weights c_t exp(-s_t) are
  differentiated (that is how s learns) and have the likelihood's scale, not T.
  """

  name = "uncertainty"

  def __init__(self, *, kinds: Sequence[str] | None = None, **unknown: Any) -> None:
    self._reject_unknown(unknown)
    if kinds is not None:
      if not isinstance(kinds, (list, tuple)) or any(k not in _KINDS for k in kinds):
        raise self._option_error("kinds", kinds, "a tuple with 'regression' or 'classification' "
                                 "per task (default: all classification)")
      kinds = tuple(kinds)
    self.kinds = kinds

  def _check_num_tasks(self, num_tasks: int) -> None:
    super()._check_num_tasks(num_tasks)
    if self.kinds is not None and len(self.kinds) != num_tasks:
      raise ConfigError(f"loss weighting 'uncertainty' has {len(self.kinds)} kinds for {num_tasks} "
                        "tasks; give one kind per task in option kinds")

  def _likelihood_scale(self, num_tasks: int) -> jax.Array:
    kinds = self.kinds or ("classification",) * num_tasks
    return jnp.asarray([_KINDS[k] for k in kinds], jnp.float32)

  def init_params(self, num_tasks: int) -> State:
    """`log_variance` [T] = s_t = log sigma_t^2, initialised to 0."""
    self._check_num_tasks(num_tasks)
    return {"log_variance": jnp.zeros(num_tasks, jnp.float32)}

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    num_tasks = _num_tasks(losses)
    self._check_num_tasks(num_tasks)
    log_variance = params["log_variance"].astype(jnp.float32)
    weights = self._likelihood_scale(num_tasks) * jnp.exp(-log_variance)
    total = jnp.sum(weights * losses.astype(jnp.float32) + 0.5 * log_variance)
    metrics = _weight_metrics(weights)
    metrics.update({f"log_variance_{t}": jax.lax.stop_gradient(log_variance[t])
                    for t in range(num_tasks)})
    return total, state, metrics


class DynamicWeightAverage(Weighting):
  """DWA (Liu et al. 2019, eq. 7): w = T softmax(r / temperature), r_t = Lbar_t(k-1) / Lbar_t(k-2).

  Lbar_t(k) is the mean loss of task t over window k of `window` consecutive calls (the paper's epochs;
  a window of steps is the equivalent for a stream without epochs). Windows 0 and 1 use w = 1. The state
  holds the running sum of the current window, its length so far, the means of the last two complete
  windows and how many windows are complete (saturating at 2).
  """

  name = "dwa"

  def __init__(self, *, temperature: float = 2.0, window: int = 100, **unknown: Any) -> None:
    self._reject_unknown(unknown)
    self.temperature = self._number("temperature", temperature)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
      raise self._option_error("window", window, "an integer >= 1 (steps per window)")
    self.window = window

  def init_state(self, num_tasks: int) -> State:
    """Window sums and counters, and the means of the last two complete windows."""
    self._check_num_tasks(num_tasks)
    zeros = jnp.zeros(num_tasks, jnp.float32)
    return {"window_sum": zeros, "window_steps": jnp.zeros((), jnp.int32),
            "last_mean": zeros, "before_last_mean": zeros,
            "windows_done": jnp.zeros((), jnp.int32)}

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    num_tasks = _num_tasks(losses)
    ratio = state["last_mean"] / jnp.maximum(state["before_last_mean"], _LOSS_FLOOR)
    dwa_weights = num_tasks * jax.nn.softmax(ratio / self.temperature)
    weights = jnp.where(state["windows_done"] >= 2, dwa_weights, 1.0)

    window_sum = state["window_sum"] + _constant_losses(losses)
    window_steps = state["window_steps"] + 1
    full = window_steps >= self.window  # close the window: shift the means, start a new sum
    new_state = {
        "window_sum": jnp.where(full, 0.0, window_sum),
        "window_steps": jnp.where(full, 0, window_steps),
        "last_mean": jnp.where(full, window_sum / self.window, state["last_mean"]),
        "before_last_mean": jnp.where(full, state["last_mean"], state["before_last_mean"]),
        "windows_done": jnp.where(full, jnp.minimum(state["windows_done"] + 1, 2),
                                  state["windows_done"]),
    }
    return _weighted(weights, losses), new_state, _weight_metrics(weights)


class RandomLossWeighting(Weighting):
  """RLW (Lin et al. 2022): w = T softmax(eps), eps ~ N(0, I) drawn from `rng` at every call."""

  name = "rlw"

  def __init__(self, **unknown: Any) -> None:
    self._reject_unknown(unknown)

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    num_tasks = _num_tasks(losses)
    if rng is None:
      raise ValueError("loss weighting 'rlw' draws its weights from rng; pass a PRNG key")
    weights = num_tasks * jax.nn.softmax(jax.random.normal(rng, (num_tasks,), jnp.float32))
    return _weighted(weights, losses), state, _weight_metrics(weights)


class GradNorm(Weighting):
  """GradNorm (Chen et al. 2018): weights in state, one gradient step on L_grad per call.

  With G_t = w_t grad_norms_t and r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)), where L(0) are the
  losses of the first call (kept in state), L_grad = sum_t |G_t - mean(G) r_t^alpha| (eq. 2) with the
  target mean(G) r^alpha held constant, as in the paper. Its gradient is sign(G_t - target_t)
  grad_norms_t; w takes one step of size `lr`, is clipped positive and renormalised to sum T. The
  current call applies the weights from before the step; the updated ones apply from the next call on,
  as in the paper's alternation of the weight and network updates.

  The norms are taken w.r.t. the shared *representation*, not the last shared layer's weights as in the
  paper: the cheap variant, read off the Gram matrix the objective computes anyway, so jtl keeps a
  single backward pass through the trunk.
  """

  name = "gradnorm"
  needs_grad_norms = True

  def __init__(self, *, alpha: float = 1.5, lr: float = 0.01, **unknown: Any) -> None:
    self._reject_unknown(unknown)
    self.alpha = self._number("alpha", alpha, positive=False)
    self.lr = self._number("lr", lr)

  def init_state(self, num_tasks: int) -> State:
    """`weights` (init 1), `initial_losses` L(0) and whether they are set yet (`started`)."""
    self._check_num_tasks(num_tasks)
    return {"weights": jnp.ones(num_tasks, jnp.float32),
            "initial_losses": jnp.ones(num_tasks, jnp.float32),
            "started": jnp.zeros((), jnp.int32)}

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    num_tasks = _num_tasks(losses)
    if grad_norms is None:
      raise ValueError("loss weighting 'gradnorm' needs grad_norms [T] (needs_grad_norms is True)")
    current = _constant_losses(losses)
    initial = jnp.where(state["started"] > 0, state["initial_losses"], current)
    norms = jax.lax.stop_gradient(grad_norms).astype(jnp.float32)
    weights = state["weights"]

    weighted_norms = weights * norms
    inverse_rate = current / initial
    relative_rate = inverse_rate / jnp.maximum(jnp.mean(inverse_rate), _LOSS_FLOOR)
    target = jnp.mean(weighted_norms) * relative_rate ** self.alpha
    gap = weighted_norms - target
    gradnorm_loss = jnp.sum(jnp.abs(gap))
    stepped = jnp.maximum(weights - self.lr * jnp.sign(gap) * norms, _MIN_WEIGHT)
    new_weights = num_tasks * stepped / jnp.sum(stepped)

    new_state = {"weights": new_weights, "initial_losses": initial,
                 "started": jnp.ones((), jnp.int32)}
    metrics = _weight_metrics(weights)
    metrics["gradnorm_loss"] = gradnorm_loss
    return _weighted(weights, losses), new_state, metrics


class FAMO(Weighting):
  """FAMO (Liu et al. 2023, Algorithm 1) with a one-step delay in the logit update.

  Logits xi (state, init 0), z = softmax(xi). The update direction is sum_t c z_t / L_t grad L_t with
  c = 1 / sum_t (z_t / L_t), i.e. constant weights w_t = T c z_t / L_t = T softmax(xi - log L)_t (the
  T for the jtl scale; the softmax form is the stable way to compute it). Algorithm 1 updates

      xi <- xi - lr (J_z(xi)^T delta + gamma xi),  delta_t = log L_t(before) - log L_t(after),

  where J_z = diag(z) - z z^T is the softmax Jacobian: a task whose loss fell less than the others
  gains logit. The paper measures L(after) with an extra forward pass on the same batch after the
  parameter step. Here, to avoid it, L(after) is the *next call's* losses, on the next batch: at call k,
  delta = log L(k-1) - log L(k), applied to the logits that produced step k-1's weights, and then the
  updated logits weight call k. This one-step delay also measures the loss change across two batches,
  so delta carries batch-to-batch noise that the paper's same-batch difference does not. The first call
  has no previous losses and leaves xi unchanged.
  """

  name = "famo"

  def __init__(self, *, lr: float = 0.025, gamma: float = 1e-3, **unknown: Any) -> None:
    self._reject_unknown(unknown)
    self.lr = self._number("lr", lr)
    self.gamma = self._number("gamma", gamma, positive=False)

  def init_state(self, num_tasks: int) -> State:
    """`logits` xi (init 0), the previous call's losses and whether there was one (`started`)."""
    self._check_num_tasks(num_tasks)
    return {"logits": jnp.zeros(num_tasks, jnp.float32),
            "previous_losses": jnp.ones(num_tasks, jnp.float32),
            "started": jnp.zeros((), jnp.int32)}

  def total(self, losses: jax.Array, *, params: State, state: State, rng: jax.Array | None,
            step: jax.Array, grad_norms: jax.Array | None = None) -> Result:
    num_tasks = _num_tasks(losses)
    current = _constant_losses(losses)
    log_losses = jnp.log(current)
    logits = state["logits"]
    delta = jnp.log(state["previous_losses"]) - log_losses
    z = jax.nn.softmax(logits)
    softmax_vjp = z * (delta - jnp.sum(z * delta))  # J_z^T delta, J_z symmetric
    updated = logits - self.lr * (softmax_vjp + self.gamma * logits)
    logits = jnp.where(state["started"] > 0, updated, logits)

    weights = num_tasks * jax.nn.softmax(logits - log_losses)
    new_state = {"logits": logits, "previous_losses": current,
                 "started": jnp.ones((), jnp.int32)}
    return _weighted(weights, losses), new_state, _weight_metrics(weights)


WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (Equal, Static, Uncertainty, DynamicWeightAverage, RandomLossWeighting,
                              GradNorm, FAMO)}


def make_weighting(name: str, **options: Any) -> Weighting:
  """The weighting `name` from WEIGHTINGS built with `options`; ConfigError for an unknown name."""
  if name not in WEIGHTINGS:
    close = difflib.get_close_matches(str(name), WEIGHTINGS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown loss weighting {name!r}{hint}; choose one of {', '.join(WEIGHTINGS)}")
  return WEIGHTINGS[name](**options)
