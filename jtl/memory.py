"""Does a batch fit in memory? An estimate from the model's saved activations, before anything runs.

A train step keeps, between its forward and backward pass, the activations the gradient needs (the
residuals of `jax.vjp`); they grow linearly with the batch. Their size per example is read from two
abstract traces of the objective's loss (`jax.eval_shape`: no array is allocated, nothing is
compiled) on a small batch and on twice that batch: the difference, divided by the examples added,
is the per-example part (parameters and other fixed-size residuals cancel). The step needs at least
that many bytes per example it processes at once, and usually more: XLA's temporaries come on top
(the compiled gradient's temporary memory was 1.08-1.29x the estimate on the digits CNNs at batch
512-2048, tests/test_memory.py), as do parameters, optimizer state and the input pipeline. So a batch whose estimate alone
exceeds the memory that is free refuses a run that could not have run.

Memory that counts: on CPU, the host's available memory (all local CPU devices share it; a step
processes `batch_size / processes / grad_accum_steps` examples at once there); on an accelerator,
one device's free memory (`memory_stats`), for its `batch_size / batch-axis devices /
grad_accum_steps` examples.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jtl import data as data_lib
from jtl import masks, objectives, phases, sharding
from jtl.data import pipeline
from jtl.errors import ConfigError

PyTree = Any


def _bytes(tree: PyTree) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _scaled(batch: PyTree, factor: int) -> PyTree:
  """Abstract `batch` with every leading dimension times `factor`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * factor,) + x.shape[1:],
                                                     x.dtype), batch)


def activation_bytes_per_example(objective: Any, config: ml_collections.ConfigDict,
                                 small_batch: PyTree) -> float:
  """Bytes of saved activations per example of the (global) batch, for the objective's loss with
  the first phase's trainable parameters; `small_batch` (host arrays, any small size) gives the
  structure and the example count (its largest leading dimension)."""
  params, model_state = jax.eval_shape(objective.init, jax.random.key(0), _scaled(small_batch, 1))
  rules = phases.phase_config(config, phases.schedule(config)[0]).trainable
  trainable = masks.trainable_mask(params, rules)
  trainable_params, frozen_params = masks.partition(params, trainable)

  def residuals(trainable_params, frozen_params, model_state, batch):
    def loss(tp):
      merged = masks.merge(tp, frozen_params)
      return objective.loss(merged, model_state, batch, jax.random.key(0), trainable=trainable)[0]
    return jax.vjp(loss, trainable_params)[1]  # a pytree whose leaves are the residuals

  sizes = [_bytes(jax.eval_shape(residuals, trainable_params, frozen_params, model_state,
                                 _scaled(small_batch, factor))) for factor in (1, 2)]
  examples = max(x.shape[0] for x in jax.tree.leaves(small_batch))
  return max(sizes[1] - sizes[0], 0) / examples


def available_bytes() -> tuple[int | None, str]:
  """(free bytes of the memory one step's activations live in, what it is); None if unknown."""
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
      return int(info["MemAvailable"].split()[0]) * 1024, "available host memory"
    except (OSError, KeyError, ValueError):
      try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory"
      except (ValueError, OSError, AttributeError):
        return None, "host memory"
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return None, f"{device.platform} memory"
  free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return free, f"free memory of one {device.device_kind}"


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.3g} TB"


def examples_at_once(config: ml_collections.ConfigDict) -> float:
  """Examples of the global batch one memory pool (the host on CPU, a device otherwise) processes
  at once: the batch over the processes (CPU) or batch-axis devices, over grad_accum_steps."""
  accum = int(config.get("grad_accum_steps", 1))
  if jax.local_devices()[0].platform == "cpu":
    return config.batch_size / jax.process_count() / accum
  mesh = sharding.make_mesh(config.mesh)
  return config.batch_size / sharding.batch_size_divisor(mesh, config.mesh.batch_axes) / accum


# An estimate is made only when the input of the examples processed at once, times this, reaches the
# free memory: no model here keeps more than a few hundred times its input per example (the digits
# CNN ~360x, counting its im2col copies), so smaller batches cannot run out of activation memory and
# skip the two traces (every ordinary run; about 0.5-1 s on 2 cores).
INPUT_FACTOR = 10_000


def worth_estimating(config: ml_collections.ConfigDict, input_bytes_per_example: int) -> bool:
  """Whether the batch's input is large enough against the free memory to estimate its
  activations (`INPUT_FACTOR`)."""
  free, _ = available_bytes()
  return free is not None and (examples_at_once(config) * input_bytes_per_example * INPUT_FACTOR
                               >= free)


def check_batch_fits(config: ml_collections.ConfigDict, objective: Any, small_batch: PyTree,
                     train_examples: int | None = None, unit: str = "example") -> None:
  """ConfigError if the step's activations alone (`activation_bytes_per_example` times
  `examples_at_once`) exceed the free memory; the message gives the estimate and a batch that fits.
  An objective whose loss cannot be traced this way (none known) is not checked: the check only
  ever refuses what it measured."""
  try:
    per_example = activation_bytes_per_example(objective, config, small_batch)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (an estimate, not a requirement)
    logging.warning("no activation-memory estimate for this objective (%s: %s); batch_size is not "
                    "checked against memory", type(e).__name__, str(e).splitlines()[0][:200] if
                    str(e) else "")
    return
  free, where = available_bytes()
  at_once = examples_at_once(config)
  need = per_example * at_once
  logging.info("activation memory: about %s per example, at least %s for batch_size=%d (%s: %s)",
               _size(per_example), _size(need), config.batch_size, where,
               _size(free) if free is not None else "unknown")
  if free is None or need <= free:
    return
  fits = int(config.batch_size * free / need)
  examples = f"{unit}s"
  data = (f"; the train split has {train_examples} examples, so each would appear about "
          f"{config.batch_size // train_examples} times per batch" if train_examples and
          config.batch_size > train_examples else "")
  raise ConfigError(
      f"batch_size={config.batch_size} needs at least {_size(need)} of activations per step "
      f"({_size(per_example)} per {unit} x {at_once:g} {examples} at once), more than the "
      f"{_size(free)} of {where}{data}; lower --config.batch_size (about {fits} fits) or raise "
      f"--config.grad_accum_steps (the step then holds batch_size / k {examples} at once)")


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError if batch_size's activations cannot fit in memory, judged before the
  first full batch is built (a batch of 1e9 images would not fit either). Batches whose input is
  small against the free memory (`worth_estimating`: every ordinary run) skip the estimate,
  which costs a small batch and two traces."""
  members = data_lib.mixture_members(config.data)
  resolved = list(members.values()) or [data_lib.validate(config.data)]
  input_bytes = max(int(np.prod(pipeline.stored_image_shape(c))) * 4 for c in resolved)
  episodes = config.data.get("episodes") or {}
  if episodes.get("ways", 0):  # batch_size counts episodes
    input_bytes *= episodes.ways * (episodes.shots + episodes.queries)
  if not worth_estimating(config, input_bytes):
    return
  small = jax.process_count() * max(1, len(members))
  small_batch = next(data_lib.train_iterator(config.data, global_batch_size=small, seed=config.seed,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count()))
  train_examples = (None if members or episodes.get("ways", 0) else
                    data_lib.num_examples(config.data, config.data.train_split))
  check_batch_fits(config, objectives.build(config), small_batch, train_examples,
                          unit="episode" if episodes.get("ways", 0) else "example")
