"""Evaluators and the checkpoint-driven evaluation loop.

An evaluator is a small object whose `run(params, model_state)` yields `(name, value)` pairs; the loop
neither knows nor cares which evaluators exist. The loop evaluates every completed checkpoint of a
workdir that is not yet in `eval_metrics.jsonl`, appends one JSON object per step, and with `watch`
keeps polling until the run's final step is evaluated (or a timeout). Orbax lists only fully written
checkpoints, so a checkpoint still being written is never read; the JSONL file is the record of what was
evaluated, so nothing is evaluated twice, across restarts of the evaluator too.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jtl import checkpoint, data
from jtl import config as config_lib
from jtl.errors import ConfigError
from jtl.metric_writer import MetricWriter, read_jsonl
from jtl.objectives import Objective
from jtl.sharding import to_global
from jtl.train import Setup, setup


class Evaluator:
  """Averages an objective's per-example `eval_metrics` over a whole split (padding masked out)."""

  def __init__(self, objective: Objective, data_config: ml_collections.ConfigDict, split: str,
               batch_size: int, batch_sharding: NamedSharding, prefix: str | None = None):
    self.prefix = prefix or split.split("[")[0]
    self.batch_sharding = batch_sharding
    self.make_batches, self.num_batches = data.eval_iterator(
        data_config, split=split, global_batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())

    def sums(params, model_state, batch):
      per_example = objective.eval_metrics(params, model_state, batch)
      mask = batch["mask"]
      return {k: jnp.sum(v * mask) for k, v in per_example.items()}, jnp.sum(mask)

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    self._sums = jax.jit(sums, out_shardings=replicated)

  def run(self, params: Any, model_state: Any) -> Iterator[tuple[str, float]]:
    totals, count = None, 0.0
    for local_batch in self.make_batches():
      batch_sums, n = self._sums(params, model_state, to_global(local_batch, self.batch_sharding))
      totals = batch_sums if totals is None else jax.tree.map(jnp.add, totals, batch_sums)
      count = count + n
    totals, count = jax.device_get((totals, count))
    for name, total in sorted(totals.items()):
      yield f"{self.prefix}/{name}", float(total / count)
    yield f"{self.prefix}/num_examples", int(count)


def build_evaluators(s: Setup) -> list[Evaluator]:
  config = s.config
  eval_cfg = config.get("eval", ml_collections.ConfigDict())
  splits = eval_cfg.get("splits", None) or (config.data.eval_split,)
  batch_size = eval_cfg.get("batch_size", None) or config.batch_size
  return [Evaluator(s.objective, config.data, split, batch_size, s.batch_sharding) for split in splits]


def setup_for_eval(config: ml_collections.ConfigDict) -> tuple[Setup, list[Evaluator]]:
  """Validates the config and builds the abstract state and evaluators; writes nothing."""
  data.validate(config.data)
  make_batches, _ = data.eval_iterator(
      config.data, split=config.data.eval_split, global_batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  example = next(iter(make_batches()))
  s = setup(config, example)
  return s, build_evaluators(s)


def evaluate_step(s: Setup, evaluators: list[Evaluator], workdir: str | epath.Path,
                  step: int) -> dict[str, Any]:
  """Restores params and model_state of one checkpoint and runs every evaluator on it."""
  with checkpoint.manager(workdir, keep=None, async_save=False, create=False) as mgr:
    restored = checkpoint.restore(mgr, step, {"params": s.abstract_state.params,
                                              "model_state": s.abstract_state.model_state})
  row: dict[str, Any] = {}
  for evaluator in evaluators:
    row.update(evaluator.run(restored["params"], restored["model_state"]))
  return row


# Keys of a given config that do not change what a run's checkpoints mean.
_EVAL_SIDE = ("log_every", "checkpoint_every", "keep_checkpoints", "eval.*", "mesh.*", "init_from.*")


def effective_config(given: ml_collections.ConfigDict | None, workdir: epath.Path
                     ) -> ml_collections.ConfigDict:
  """The config to evaluate `workdir` with: the run's own `config.json`, with the given config's `eval`
  and `mesh` sections. Where the given config differs in anything that matters, it says so."""
  run = config_lib.load_run_config(workdir)
  if run is None:
    if given is None:
      raise ConfigError(f"{workdir} holds no config.json (no run was started there); train there "
                        "first, or pass --config")
    return given
  if given is None:
    return run
  changed = config_lib.differences(run, given, ignore=_EVAL_SIDE)
  if changed:
    logging.warning("the given config differs from the run's %s in: %s; following the run's",
                    config_lib.run_config_path(workdir), "; ".join(changed))
  merged = copy.deepcopy(run)
  for section in ("eval", "mesh"):
    if section in given:
      merged[section] = ml_collections.ConfigDict(config_lib.as_plain(given[section]))
  return merged


def evaluate_checkpoints(config: ml_collections.ConfigDict | None, workdir: str | os.PathLike, *,
                         watch: bool = False, step: int | None = None, timeout: float = 3600.0,
                         poll_every: float = 5.0) -> list[dict[str, Any]]:
  """Evaluates the not-yet-evaluated checkpoints of `workdir` (or only `step`); returns new rows.

  `config` may be None: the run's own `config.json` is used (see `effective_config`).
  """
  workdir = epath.Path(config_lib.resolve_path(os.fspath(workdir)))
  deadline = time.time() + timeout
  if watch and config is None:  # started beside a trainer that has not written its config yet
    while not config_lib.run_config_path(workdir).exists() and time.time() < deadline:
      time.sleep(poll_every)
  if not watch:
    available = checkpoint.completed_steps(workdir)
    if not available:
      raise ConfigError(f"no checkpoints in {workdir}; train there first, or pass --watch to wait")
    if step is not None and step not in available:
      raise ConfigError(f"no checkpoint for step {step} in {workdir}; available: {available}")
  config = config_lib.prepare(effective_config(config, workdir))
  s, evaluators = setup_for_eval(config)
  writer = MetricWriter(workdir, "eval_metrics")
  done = {row["step"] for row in read_jsonl(writer.path)}
  new_rows = []
  try:
    while True:
      available = checkpoint.completed_steps(workdir)
      todo = [t for t in available if t not in done and (step is None or t == step)]
      for t in todo:
        try:
          row = evaluate_step(s, evaluators, workdir, t)
        except FileNotFoundError:  # deleted by the trainer's keep-K policy before we got to it
          logging.warning("checkpoint %d vanished before it was evaluated; skipped", t)
          continue
        writer.write(t, row)
        done.add(t)
        new_rows.append({"step": t, **row})
        logging.info("step %d: %s", t, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
      finished = (step in done) if step is not None else (config.total_steps in done)
      if not watch or finished or time.time() > deadline:
        break
      time.sleep(poll_every)
  finally:
    writer.close()
  return new_rows
