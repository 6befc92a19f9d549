"""Shared layers: a BatchNorm that can be frozen per module path, and common initialisers.

Freezing BatchNorm in the frozen part of a model means two things: use the running statistics, and
do not update them. Flax writes `batch_stats` only when it computes batch statistics, so routing
`use_running_average=True` to the frozen modules gives both. Which modules are frozen is set from
the outside (the objective, from the parameter mask) with `frozen_norms`, so models need no extra
argument:

  with frozen_norms(masks.frozen_modules(trainable_mask)):
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])

The set is read when the model is *traced*: under `jax.jit`, enter the context inside the traced
function (or keep the set fixed for the life of the jitted function), or a cached trace will not
see it.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import flax.linen as nn
import jax.numpy as jnp

# He init with fan_out, as torchvision initialises ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

_FROZEN_NORMS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    'jtl_frozen_norms', default=frozenset())


@contextlib.contextmanager
def frozen_norms(module_paths: Iterable[str]) -> Iterator[frozenset[str]]:
  """Within this context, `BatchNorm`s whose module path is in `module_paths` are frozen.

  A module path is the `/`-joined scope path without a collection prefix, e.g.
  `backbone/stage1_block0/bn1` (what `jtl.masks.frozen_modules` returns). Paths that name no
  BatchNorm are ignored, so a set of all frozen modules can be passed as is.
  """
  paths = frozenset(module_paths)
  token = _FROZEN_NORMS.set(paths)
  try:
    yield paths
  finally:
    _FROZEN_NORMS.reset(token)


def current_frozen_norms() -> frozenset[str]:
  """The module paths frozen by the innermost active `frozen_norms` context (empty outside one)."""
  return _FROZEN_NORMS.get()


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` called as `bn(x, train)`, frozen when its path is in `frozen_norms(...)`.

  Defaults follow PyTorch (momentum 0.9 here == 0.1 there, epsilon 1e-5).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5

  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:  # type: ignore[override]
    frozen = '/'.join(self.scope.path) in _FROZEN_NORMS.get()
    return super().__call__(x, use_running_average=(not train) or frozen)
