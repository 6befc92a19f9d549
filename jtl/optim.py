"""Optimizer from config: optax chain over the *trainable* subtree only.

The transformation returned here is initialised on and applied to the trainable part of the params
(see `jtl.masks.partition`), so frozen leaves have no optimizer state and no update. Gradient clipping
therefore sees only trainable gradients, which keeps XLA free to drop the frozen backward pass.

Config (`config.optim`):
  name: sgd | momentum | adam | adamw
  lr, schedule (constant | cosine | steps), warmup_steps, end_lr_factor (cosine),
  boundaries + decay_factor (steps; boundaries as fractions of total_steps if all < 1)
  momentum (sgd/momentum), b1, b2, eps (adam/adamw)
  weight_decay, decay_rules: rule table over param paths (default: only `kernel`/`embedding` leaves, so
    biases, norm scales, position embeddings and tokens are not decayed)
  clip_norm: global-norm clip over trainable gradients (None = off)
  lr_mults: rule table of per-group learning-rate multipliers, e.g. [('params/backbone/.*', 0.1)]
  layer_decay: layer-wise learning-rate decay (e.g. 0.75; None = off): decay ** (depth from the top),
    composed with lr_mults (see jtl/layer_decay.py)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

import jax
import ml_collections
from ml_collections import config_dict
import optax

from jtl import layer_decay, masks
from jtl.config import check_number, check_positive_int
from jtl.errors import ConfigError

DEFAULT_DECAY_RULES = ((".*/(kernel|embedding)", True), (".*", False))


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0, end_lr_factor=0.0,
      boundaries=(0.5, 0.75), decay_factor=0.1, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=1e-4, decay_rules=DEFAULT_DECAY_RULES,
      clip_norm=config_dict.placeholder(float), lr_mults=(),
      layer_decay=config_dict.placeholder(float)))


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "steps")


def _choice(value: Any, choices: tuple[str, ...], key: str) -> None:
  if value not in choices:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown {key} {value!r}{hint}; use one of {', '.join(choices)} "
                      f"(--config.{key})")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Range checks of every optimizer option; ConfigError names the flag to fix."""
  _choice(cfg.name, OPTIMIZERS, "optim.name")
  _choice(cfg.schedule, SCHEDULES, "optim.schedule")
  check_number(cfg.lr, "optim.lr", low=0.0, low_open=True)
  check_positive_int(cfg.get("warmup_steps", 0), "optim.warmup_steps", minimum=0)
  check_number(cfg.get("end_lr_factor", 0.0), "optim.end_lr_factor", low=0.0, high=1.0)
  check_number(cfg.get("decay_factor", 0.1), "optim.decay_factor", low=0.0, low_open=True)
  for key in ("momentum", "b1", "b2"):
    check_number(cfg.get(key, 0.9), f"optim.{key}", low=0.0, high=1.0, high_open=True)
  check_number(cfg.get("eps", 1e-8), "optim.eps", low=0.0, low_open=True)
  check_number(cfg.get("weight_decay", 0.0), "optim.weight_decay", low=0.0)
  check_number(cfg.get("clip_norm"), "optim.clip_norm", low=0.0, low_open=True, allow_none=True)
  check_number(cfg.get("layer_decay"), "optim.layer_decay", low=0.0, high=1.0, low_open=True,
               allow_none=True)
  for b in cfg.get("boundaries", ()):
    check_number(b, "optim.boundaries", low=0.0, low_open=True)


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable[[Any], Any]:
  """Learning-rate schedule: linear warmup, then constant, cosine or step decay."""
  warmup = int(cfg.get("warmup_steps", 0))
  if warmup >= total_steps and cfg.schedule != "constant":
    raise ConfigError(f"optim.warmup_steps={warmup} must be < total_steps={total_steps}; lower it "
                      "(--config.optim.warmup_steps, e.g. 0 for a short run)")
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.get("end_lr_factor", 0.0))
  elif cfg.schedule == "steps":
    bounds = list(cfg.boundaries)
    if bounds and all(b < 1 for b in bounds):
      bounds = [int(b * decay_steps) for b in bounds]
    main = optax.piecewise_constant_schedule(cfg.lr, {int(b): cfg.decay_factor for b in bounds})
  else:
    _choice(cfg.schedule, SCHEDULES, "optim.schedule")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by a per-leaf constant (per-group learning rates); stateless."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _direction(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The stateful, per-leaf part of the optimizer (before weight decay and the learning rate)."""
  if cfg.name == "sgd":
    return optax.identity()
  if cfg.name == "momentum":
    return optax.trace(decay=cfg.get("momentum", 0.9))
  return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def build_optimizer(cfg: ml_collections.ConfigDict, params: Any, trainable: Any, total_steps: int,
                    join_groups: Any = None
                    ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Returns (tx for the trainable subtree, lr schedule).

  The chain: [global-norm clip] -> per-leaf direction (sgd: identity, momentum: trace, adam/adamw:
  scale_by_adam) with weight decay coupled before it (sgd, momentum, adam: L2) or decoupled after it
  (adamw) -> the learning-rate schedule -> per-leaf multipliers (`lr_mults` times layer decay).

  `join_groups` (a label tree over the trainable subtree, from `jtl.phases`) gives every group of
  leaves that started training together its own direction state (moments and their bias-correction
  count), so leaves that join in a later phase start cleanly while the others carry on; the schedule's
  step count is shared. Rule tables are matched against the *full* params tree (so a typo is caught even
  where it names only frozen leaves), then cut down to the trainable part.
  """
  check_config(cfg)
  schedule = make_schedule(cfg, total_steps)
  decay_mask = masks.match(params, cfg.get("decay_rules", DEFAULT_DECAY_RULES), what="decay rule")
  decay_mask, _ = masks.partition(decay_mask, trainable)
  wd = float(cfg.get("weight_decay", 0.0))
  direction = _direction(cfg)
  if join_groups is not None:
    groups = sorted(set(jax.tree.leaves(join_groups)))
    direction = optax.partition({g: _direction(cfg) for g in groups}, join_groups)
  decay = optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity()
  chain = [optax.clip_by_global_norm(float(cfg.clip_norm))] if cfg.get("clip_norm") else []
  chain += [direction, decay] if cfg.name == "adamw" else [decay, direction]
  chain.append(optax.scale_by_learning_rate(schedule))
  mults = None
  if cfg.get("lr_mults"):
    mults = masks.match(params, cfg.lr_mults, default=1.0, what="lr_mults rule")
  if cfg.get("layer_decay"):
    layer = layer_decay.multipliers(params, cfg.layer_decay)
    mults = layer if mults is None else jax.tree.map(lambda a, b: a * b, mults, layer)
  if mults is not None:
    chain.append(_scale_by_tree(masks.partition(mults, trainable)[0]))
  return optax.chain(*chain), schedule
