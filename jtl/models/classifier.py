"""`Classifier`: a backbone producing pooled features, plus a linear head.

Every registered model is a `Classifier`, so every params tree is `{'backbone': ..., 'head': ...}`
(just `{'backbone': ...}` without a head), and a mask like `params/head/.*` means the same thing for
every architecture.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jtl.errors import ConfigError

HEAD_INITS = {
    # Zeros: a new head starts at uniform predictions and does not perturb the pretrained backbone's
    # gradients with a random projection — the usual choice for transfer.
    'zeros': nn.initializers.zeros,
    'lecun_normal': nn.initializers.lecun_normal(),
    'xavier_uniform': nn.initializers.xavier_uniform(),
    'normal': nn.initializers.normal(stddev=0.01),
}


class Classifier(nn.Module):
  """A backbone `f(x, train) -> [B, D]` followed by `nn.Dense(num_classes, name='head')`.

  Attributes:
    backbone: module mapping images `[B, H, W, C]` to pooled features `[B, D]`.
    num_classes: output classes; 0 or None means no head (`__call__` returns the features).
    head_init: kernel initialiser of the head, a key of `HEAD_INITS` (the bias starts at zero).
    dtype: compute dtype of the head; outputs are returned as float32 for the losses.
  """
  backbone: nn.Module
  num_classes: int | None
  head_init: str = 'zeros'
  dtype: Any = jnp.float32

  def setup(self):
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                           kernel_init=HEAD_INITS[self.head_init], bias_init=nn.initializers.zeros)

  def features(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Pooled backbone features `[B, D]` (float32)."""
    return self.backbone(x, train=train).astype(jnp.float32)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits `[B, num_classes]` (float32), or the features if there is no head."""
    features = self.backbone(x, train=train)
    if not self.num_classes:
      return features.astype(jnp.float32)
    return self.head(features).astype(jnp.float32)


def make_classifier(backbone: nn.Module, num_classes: int | None, head_init: str = 'zeros',
                    dtype: Any = jnp.float32) -> Classifier:
  """Checks the head options from the config and builds a `Classifier`."""
  if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
    raise ConfigError(f'num_classes must be an integer >= 0 (0 for no head), got {num_classes!r} '
                      '(--config.model.num_classes)')
  if head_init not in HEAD_INITS:
    raise ConfigError(f'unknown head_init {head_init!r}; choose one of: {", ".join(HEAD_INITS)} '
                      '(--config.model.head_init)')
  return Classifier(backbone=backbone, num_classes=num_classes, head_init=head_init, dtype=dtype)


def check_positive_ints(name: str, value: Any, allow_empty: bool = False) -> None:
  """Raises ConfigError unless `value` is a positive int or a tuple of them."""
  values = value if isinstance(value, tuple) else (value,)
  if (not values and not allow_empty) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
    raise ConfigError(f'{name} must be positive integer(s), got {value!r} (--config.model.{name})')
