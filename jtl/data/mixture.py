"""Several datasets per step, one per task: `config.data.mixture = {task: dict(weight=w, **overrides)}`.

Each member is `config.data` with its overrides (another `name`, `labels`, splits, ...). A training
batch is `{task: batch}`; task t gets `round(B * w_t / sum(w))` of the global batch B (largest
remainders, at least `multiple` each, the total exactly B), and its own order: member t's examples
follow the member's own seed stream (the run's seed folded with t's position), so resuming at any step
is exact for every member, as it is for one dataset. With no mixture these functions are the plain
single-dataset pipeline.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from jtl.data import config as config_lib
from jtl.data import episodes, pipeline, source
from jtl.errors import ConfigError


def members(data_config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """{task: that task's resolved data config} ({} without a mixture)."""
  c = config_lib.resolve(data_config)
  base = {k: v for k, v in c.to_dict().items() if k != 'mixture'}
  out = {}
  for task, spec in c.mixture.items():
    overrides = {k: v for k, v in dict(spec or {}).items() if k != 'weight'}
    if 'mixture' in overrides:
      raise ConfigError(f'data.mixture.{task} may not hold a mixture itself; flatten it')
    try:
      out[task] = config_lib.resolve(ml_collections.ConfigDict({**base, **overrides}))
    except ConfigError as e:
      raise ConfigError(f'data.mixture.{task}: {e}') from e
  return out


def weights(data_config: ml_collections.ConfigDict) -> dict[str, float]:
  c = config_lib.resolve(data_config)
  out = {}
  for task, spec in c.mixture.items():
    w = dict(spec or {}).get('weight', 1.0)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
      raise ConfigError(f'data.mixture.{task}.weight must be a number > 0, got {w!r}; set '
                        f'--config.data.mixture.{task}.weight')
    out[task] = float(w)
  return out


def batch_sizes(data_config: ml_collections.ConfigDict, global_batch_size: int,
                multiple: int = 1) -> dict[str, int]:
  """Per-task global batch sizes: shares of `global_batch_size` by weight, in units of `multiple`."""
  w = weights(data_config)
  units, rest = divmod(global_batch_size, multiple)
  if rest or units < len(w):
    raise ConfigError(f'batch_size={global_batch_size} cannot give each of the {len(w)} mixture '
                      f'members a multiple of {multiple}; use a multiple of {multiple * len(w)}')
  share = np.array(list(w.values())) / sum(w.values()) * units
  sizes = np.maximum(np.floor(share).astype(int), 1)
  while sizes.sum() < units:  # largest remainders first
    sizes[np.argmax(share - sizes)] += 1
  while sizes.sum() > units:
    sizes[np.argmax(np.where(sizes > 1, sizes - share, -np.inf))] -= 1
  return {task: int(n) * multiple for task, n in zip(w, sizes)}


def validate(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`source.validate` of the config and of every mixture member."""
  c = source.validate(data_config)
  for task, member in members(c).items():
    try:
      source.validate(member)
    except ConfigError as e:
      raise ConfigError(f'data.mixture.{task}: {e}') from e
  weights(c)
  return c


def train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Any]:
  """`pipeline.train_iterator`, or with a mixture an iterator of `{task: batch}`, or with
  `data.episodes.ways > 0` an iterator of N-way K-shot episode batches (`jtl.data.episodes`)."""
  kwargs = dict(start_step=start_step, process_index=process_index, process_count=process_count)
  if episodes.enabled(data_config):  # [episodes] meta-learning batches
    return episodes.train_iterator(data_config, global_batch_size=global_batch_size, seed=seed,
                                   **kwargs)
  parts = members(data_config)
  if not parts:
    return pipeline.train_iterator(data_config, global_batch_size=global_batch_size, seed=seed,
                                   **kwargs)
  sizes = batch_sizes(data_config, global_batch_size, process_count)
  iterators = {task: pipeline.train_iterator(member, global_batch_size=sizes[task],
                                             seed=seed * 1000 + i, **kwargs)
               for i, (task, member) in enumerate(parts.items())}
  return ({task: next(it) for task, it in iterators.items()} for _ in iter(int, 1))
