"""The checkpoint-driven evaluation loop (the evaluators themselves are in `jtl.evaluators`).

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
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jtl import checkpoint, compile_cache, data, evaluators, keep
from jtl import config as config_lib
from jtl import lock as workdir_lock
from jtl.errors import ConfigError, RunError
from jtl.metric_writer import MetricWriter, read_jsonl
from jtl.models import cpu_ops
from jtl.train import Setup, setup


def setup_for_eval(config: ml_collections.ConfigDict) -> tuple[Setup, list[evaluators.Evaluator]]:
  """Validates the config and builds the abstract state and evaluators; writes nothing.

  The state is set up from a training batch, exactly as the trainer did, so the abstract variables
  are the checkpoint's whatever the objective's batch looks like.
  """
  data.validate(config.data)
  example = next(data.train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count()))
  s = setup(config, example)
  return s, evaluators.build(s)


def evaluate_step(s: Setup, evaluator_list: list[evaluators.Evaluator],
                  workdir: str | epath.Path, step: int) -> dict[str, Any]:
  """Restores params and model_state of one checkpoint and runs every evaluator on it."""
  with checkpoint.manager(workdir, keep=None, async_save=False, create=False) as mgr:
    restored = checkpoint.restore(mgr, step, {"params": s.abstract_state.params,
                                              "model_state": s.abstract_state.model_state})
  row: dict[str, Any] = {}
  for evaluator in evaluator_list:
    row.update(evaluator.run(restored["params"], restored["model_state"]))
  return row


# Keys of a given config that do not change what a run's checkpoints mean.
_EVAL_SIDE = ("log_every", "checkpoint_every", "keep_checkpoints", "eval.*", "evals.*", "mesh.*",
              "init_from.*")


def effective_config(given: ml_collections.ConfigDict | None, workdir: epath.Path
                     ) -> ml_collections.ConfigDict:
  """The config to evaluate `workdir` with: the run's own `config.json`, with the given config's `eval`,
  `evals` and `mesh` sections. Where the given config differs in anything that matters, it says so."""
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
  for section in ("eval", "evals", "mesh"):
    if section in given:
      merged[section] = config_lib.from_plain(config_lib.as_plain(given[section]))
  return merged


def evaluate_checkpoints(config: ml_collections.ConfigDict | None, workdir: str | os.PathLike, *,
                         watch: bool = False, step: int | None = None, timeout: float = 3600.0,
                         poll_every: float = 5.0) -> list[dict[str, Any]]:
  """Evaluates the not-yet-evaluated checkpoints of `workdir` (or only `step`); returns new rows.

  `config` may be None: the run's own `config.json` is used (see `effective_config`).
  """
  workdir = epath.Path(config_lib.resolve_path(os.fspath(workdir)))
  deadline = time.time() + timeout
  if watch:  # register first: from now on the trainer's keep policy keeps what we have not evaluated
    keep.register_evaluator(workdir)
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
  cpu_ops.remember_choices(compile_cache.enable(config.get("compilation_cache")))
  s, evaluator_list = setup_for_eval(config)
  writer = MetricWriter(workdir, "eval_metrics")
  done = {row["step"] for row in read_jsonl(writer.path)}
  # Skipped with a warning, never recorded as evaluated: step -> which checkpoint it was (its
  # metadata), so one the trainer writes again (after moving the broken one aside) is evaluated.
  broken: dict[int, str | None] = {}
  new_rows = []
  said_waiting = False
  try:
    while True:
      available = checkpoint.completed_steps(workdir)
      for t in [t for t in available if t in broken]:
        if _identity(workdir, t) != broken[t]:
          del broken[t]  # written again since it was found broken
      todo = [t for t in available if t not in done | broken.keys() and (step is None or t == step)]
      for t in todo:
        why = keep.problem(workdir, t)
        if why and not _still_there(workdir, t):
          logging.warning("checkpoint %d vanished before it was evaluated; skipped", t)
          continue
        if why:
          logging.warning("checkpoint %d is broken (%s); skipped, not recorded as evaluated", t, why)
          broken[t] = _identity(workdir, t)
          continue
        try:
          row = evaluate_step(s, evaluator_list, workdir, t)
        except FileNotFoundError:  # deleted by the trainer's keep policy before we got to it
          logging.warning("checkpoint %d vanished before it was evaluated; skipped", t)
          continue
        except Exception:  # a damaged checkpoint? (orbax raises many types)
          if not _still_there(workdir, t):  # deleted while we read it: gone, not broken
            logging.warning("checkpoint %d vanished while it was evaluated; skipped", t)
            continue
          why = keep.verify(workdir, t)
          if why is None:
            raise
          logging.warning("checkpoint %d is broken (%s); skipped, not recorded as evaluated", t, why)
          broken[t] = _identity(workdir, t)
          continue
        writer.write(t, row)
        done.add(t)
        new_rows.append({"step": t, **row})
        logging.info("step %d: %s", t, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
        if watch:
          keep.report_evaluator_progress(workdir, t)
      finished = (step in done) if step is not None else (config.total_steps in done)
      if not todo and not new_rows and (finished or not watch):
        logging.info("%s", _nothing_to_do(workdir, writer.path, step, done, available))
      if not watch or finished:
        break
      target = config.total_steps if step is None else step
      if time.time() > deadline:  # the run's last step never came: not a success
        raise RunError(_gave_up(workdir, target, timeout, available, done))
      if todo:
        said_waiting = False
      elif not said_waiting:  # once per stretch of waiting, so a silent wait says why
        logging.info("%s", _waiting(workdir, target, available, timeout))
        said_waiting = True
      keep.report_evaluator_progress(workdir, max(done, default=-1))  # heartbeat
      time.sleep(poll_every)
  finally:
    writer.close()
    if watch and jax.process_index() == 0:  # no longer watching: the trainer need not wait for us
      (workdir / keep.EVALUATOR_FILE).unlink(missing_ok=True)
  if watch and config.total_steps in done:  # the trainer has finished: delete what it kept for us
    keep.catch_up(workdir, config.get("keep_checkpoints", 3), evaluated=done)
  return new_rows


def _nothing_to_do(workdir: epath.Path, record: epath.Path, step: int | None, done: set[int],
                   available: list[int]) -> str:
  if step is not None:
    return (f"step {step} of {workdir} was already evaluated (its row is in {record}); nothing to "
            "do (delete that row to evaluate it again)")
  evaluated = sorted(t for t in available if t in done)
  span = f" (steps {evaluated[0]}..{evaluated[-1]})" if evaluated else ""
  return (f"all {len(evaluated)} checkpoints of {workdir}{span} already evaluated (rows in "
          f"{record}); nothing to do")


def _trainer_state(workdir: epath.Path) -> str:
  holder = workdir_lock.live_holder(workdir)
  if holder is None:
    return "no trainer is running there (no live trainer.lock): it finished early, was stopped " \
           "or preempted"
  return f"a trainer still holds it ({workdir_lock.describe(holder)})"


def _waiting(workdir: epath.Path, target: int, available: list[int], timeout: float) -> str:
  newest = f"newest checkpoint: step {available[-1]}" if available else "no checkpoint yet"
  return (f"waiting for step {target} of {workdir} ({newest}; {_trainer_state(workdir)}); giving "
          f"up after --timeout={timeout:g} s")


def _gave_up(workdir: epath.Path, target: int, timeout: float, available: list[int],
             done: set[int]) -> str:
  newest = f"its newest checkpoint is step {available[-1]}" if available else "it has no checkpoint"
  return (f"--watch gave up after --timeout={timeout:g} s: step {target} of {workdir} never "
          f"appeared ({newest}, {len(done)} evaluated; {_trainer_state(workdir)}); rerun the "
          "training command to resume the run, then watch again (or raise --timeout)")


def _identity(workdir: epath.Path, step: int) -> str | None:
  """Which save of checkpoint `step` is there now: its orbax metadata (with the save's timestamps),
  or None if that is unreadable."""
  try:
    return (checkpoint.checkpoint_dir(workdir) / str(step) / "_CHECKPOINT_METADATA").read_text()
  except (OSError, UnicodeDecodeError):  # (FileNotFoundError included)
    return None


def _still_there(workdir: epath.Path, step: int) -> bool:
  return (checkpoint.checkpoint_dir(workdir) / str(step)).exists()
