"""Model registry: `@register(name)` on a factory, `build(config)` to call it from a config."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jtl.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DTYPES = ('float32', 'bfloat16', 'float16')


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Decorator: registers a factory `f(**kwargs) -> nn.Module` under `name`.

  The factory's keyword arguments are the model's config options; those without a default are
  required.
  """
  def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
      raise ValueError(f'model {name!r} is registered twice')
    _REGISTRY[name] = factory
    return factory
  return decorator


def available() -> list[str]:
  """Sorted names of all registered models."""
  return sorted(_REGISTRY)


def options(name: str) -> dict[str, Any]:
  """Config options of model `name` and their defaults (`inspect.Parameter.empty`: required)."""
  return {p.name: p.default for p in inspect.signature(_get(name)).parameters.values()}


def _get(name: Any) -> Callable[..., nn.Module]:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise ConfigError(f'unknown model {name!r}{hint}; choose one of: {", ".join(available())} '
                      '(--config.model.name)')
  return _REGISTRY[name]


def _as_dtype(value: Any) -> Any:
  if isinstance(value, str):
    if value not in _DTYPES:
      raise ConfigError(f'unknown model dtype {value!r}; choose one of: {", ".join(_DTYPES)} '
                        '(--config.model.dtype)')
    return jnp.dtype(value)
  return value


def _freeze_lists(value: Any) -> Any:
  # Config lists become tuples: module fields should be hashable and immutable.
  if isinstance(value, (list, tuple)):
    return tuple(_freeze_lists(v) for v in value)
  return value


def build(model_config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """Builds the model named `model_config.name` with the remaining entries as keyword arguments.

  Every keyword argument of the registered factory is a config option (`--config.model.KEY=VALUE`
  from the command line). An option set to None takes the factory's default, so an option a config
  file sets for one model can be dropped when switching to another (`--config.model.widths=None`).

  Args:
    model_config: an `ml_collections.ConfigDict` (or mapping) with `name` and the model's options,
      e.g. `{'name': 'resnet18', 'num_classes': 10, 'dtype': 'bfloat16'}`.
    **overrides: options that replace those in `model_config` (e.g. `num_classes=0` for a backbone).

  Raises:
    ConfigError: unknown model name, unknown option, or a required option is missing.
  """
  config = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  config.update(overrides)
  name = config.pop('name', None)
  factory = _get(name)
  params = inspect.signature(factory).parameters
  config = {k: v for k, v in config.items() if v is not None}
  unknown = sorted(set(config) - set(params))
  if unknown:
    close = difflib.get_close_matches(unknown[0], list(params), n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise ConfigError(f'model {name!r} has no option(s) {", ".join(unknown)}{hint}; valid options: '
                      f'{", ".join(params)} (--config.model.KEY; set a leftover option to None to '
                      'drop it)')
  missing = [p for p, spec in params.items() if spec.default is spec.empty and p not in config]
  if missing:
    raise ConfigError(f'model {name!r} needs {", ".join(missing)}; set it in the config '
                      f'(--config.model.{missing[0]}=...)')
  kwargs = {k: _freeze_lists(v) for k, v in config.items()}
  if 'dtype' in kwargs:
    kwargs['dtype'] = _as_dtype(kwargs['dtype'])
  return factory(**kwargs)
