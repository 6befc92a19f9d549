"""The trainer: TrainState, the one jitted step over a Mesh, and the loop.

It knows nothing about any paradigm: an `Objective` (jtl/objectives/base.py) supplies init, gradients
and metrics; masks say which leaves train; the optimizer sees only those. Everything that can be wrong
with a config is checked in `setup` (data, model, masks, optimizer, init_from) before anything is
compiled or written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jtl import (accumulate, checkpoint, compile_cache, data, hparams, keep, loop, masks, memory,
                 objectives, optim, phases, progress, resume, sharding, signals)
from jtl import config as config_lib
from jtl import lock as workdir_lock
from jtl.errors import ConfigError
from jtl.metric_writer import MetricWriter
from jtl.models import cpu_ops


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


@dataclasses.dataclass
class Setup:
  """Everything built from a config and an example batch, before any compilation."""
  config: ml_collections.ConfigDict
  objective: objectives.Objective
  mesh: jax.sharding.Mesh
  batch_sharding: NamedSharding
  trainable: Any  # bool tree over params
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  abstract_batch: Any
  abstract_state: TrainState
  state_shardings: TrainState
  phase: phases.Phase


def global_shapes(local_batch: Any, batch_sharding: NamedSharding) -> Any:
  """Abstract global batch from one host-local batch (leading dim × process count)."""
  n = jax.process_count()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * n,) + x.shape[1:], x.dtype,
                                                     sharding=batch_sharding), local_batch)


def setup(config: ml_collections.ConfigDict, example_batch: Any,
          phase: phases.Phase | None = None) -> Setup:
  """Builds objective, mesh, masks, optimizer and abstract sharded state for one phase of the run
  (default: the first); raises ConfigError early, for every phase's rule tables."""
  config = config_lib.prepare(config)  # (idempotent: train() has done it already)
  objective = objectives.build(config)
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh, config.mesh.batch_axes))
  divisor = sharding.batch_size_divisor(mesh, config.mesh.batch_axes)
  if config.batch_size % divisor:
    raise ConfigError(f"batch_size={config.batch_size} does not split over the {divisor} devices of the "
                      f"batch axes; use a multiple of {divisor} (--config.batch_size)")
  accum = config.get("grad_accum_steps", 1)
  for rows in {x.shape[0] * jax.process_count() for x in jax.tree.leaves(example_batch)}:
    if rows % (divisor * accum):  # also a part of a composite batch (one task's share of a mixture)
      raise ConfigError(f"a batch (part) of {rows} rows does not split into grad_accum_steps={accum} "
                        f"micro-batches over the {divisor} devices; make it a multiple of "
                        f"{divisor * accum} (--config.batch_size)")
  abstract_batch = global_shapes(example_batch, batch_sharding)
  rng = jax.random.key(config.seed)
  params, model_state = jax.eval_shape(objective.init, rng, abstract_batch)
  phase = phase or phases.schedule(config)[0]
  phase_config = phases.phase_config(config, phase)
  trainable = masks.trainable_mask(params, phase_config.trainable)
  groups = phases.join_groups(params, config)
  if groups is not None:
    groups = masks.partition(groups, trainable)[0]
  tx, schedule = optim.build_optimizer(phase_config.optim, params, trainable, config.total_steps,
                                       join_groups=groups)
  opt_state = jax.eval_shape(tx.init, masks.partition(params, trainable)[0])
  abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, model_state, opt_state)
  shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.rules, config.mesh)
  # Abstract leaves carry their target sharding, so a checkpoint restores onto this run's devices
  # whatever the topology of the run that wrote it.
  abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                abstract_state, shardings)
  return Setup(config, objective, mesh, batch_sharding, trainable, tx, schedule, abstract_batch,
               abstract_state, shardings, phase)


def make_train_step(s: Setup) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """The jitted, donated, sharded step. Only the trainable subtree is differentiated and updated.

  With `skip_nonfinite_updates`, an update whose metrics or gradients are not all finite is refused
  inside the step (state unchanged but for the step count; `skipped` = 1 in its metrics). With
  `grad_accum_steps = k`, the gradients of k micro-batches are averaged in a `lax.scan`, so
  activation memory is that of one micro-batch; every objective sees one optimizer step
  (`jtl.accumulate`, and "One optimizer step" in jtl/objectives/base.py).
  """
  base_rng = jax.random.key(s.config.seed + 1)
  skip_nonfinite = bool(s.config.get("skip_nonfinite_updates"))
  accum = int(s.config.get("grad_accum_steps", 1))

  def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(base_rng, state.step)
    trainable_params, frozen_params = masks.partition(state.params, s.trainable)
    grads, model_state, metrics = accumulate.gradients(
        s.objective, trainable_params, frozen_params, state.model_state, batch, rng,
        trainable=s.trainable, step=state.step, accum=accum)
    updates, opt_state = s.tx.update(grads, state.opt_state, trainable_params)
    trainable_params = optax.apply_updates(trainable_params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": s.schedule(state.step)}
    new_state = TrainState(state.step + 1, masks.merge(trainable_params, frozen_params),
                           model_state, opt_state)
    if skip_nonfinite:
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
      # A conditional, not a jnp.where over the state: the select fused with the update changed how
      # XLA rounded the moving averages (BatchNorm statistics, Adam moments 1e-7 off by step 20), so a
      # run with the guard on did not continue bit-identically one without it while nothing is skipped.
      new_state = jax.lax.cond(finite, lambda new, old: new, lambda new, old: old, new_state, state)
      new_state = new_state.replace(step=state.step + 1)
      metrics["skipped"] = jnp.logical_not(finite).astype(jnp.float32)
    return new_state, metrics

  replicated = NamedSharding(s.mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(s.state_shardings, s.batch_sharding),
                 out_shardings=(s.state_shardings, replicated), donate_argnums=0)


def fresh_variables(s: Setup) -> tuple[Any, Any]:
  """(params, model_state) from the objective's init, created directly with the state's shardings."""
  def init():
    batch = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), s.abstract_batch)
    return s.objective.init(jax.random.key(s.config.seed), batch)
  return jax.jit(init, out_shardings=(s.state_shardings.params, s.state_shardings.model_state))()


def load_transfer_source(s: Setup) -> tuple[Any, Any] | None:
  """Every weight step 0 loads, merged onto the abstract variables (None if it loads none):
  `init_from`'s checkpoint or file, and the weights the objective declares (`loaded_weights`, e.g. a
  distillation teacher: each fills its own entry of params and model_state, which `init_from`
  then leaves alone). Whatever the paradigm, every loaded weight comes in here.

  Checked against abstract shapes and read on the host, so a mismatch stops the run before anything
  compiles or is written; `init_variables` places it on the devices.
  """
  declared = s.objective.loaded_weights()
  init_from = s.config.get("init_from")
  with_init_from = bool(init_from and (init_from.get("workdir") or init_from.get("path")))
  if not declared and not with_init_from:
    return None
  params, model_state = s.abstract_state.params, s.abstract_state.model_state
  if declared:  # the declared entries are theirs alone: init_from sees the rest
    owned = {w.key for w in declared}
    params, model_state = ({k: v for k, v in tree.items() if k not in owned}
                           for tree in (params, model_state))
  if with_init_from:
    params, model_state, _ = checkpoint.transfer_init(params, model_state, init_from)
  for w in declared:
    params[w.key], model_state[w.key] = checkpoint.load_whole(
        s.abstract_state.params[w.key], s.abstract_state.model_state.get(w.key, {}),
        config_lib.resolve_path(w.workdir), w.step, role=w.role, workdir_option=w.workdir_option,
        step_option=w.step_option, fix=w.fix)
  return params, model_state


def init_variables(s: Setup, loaded: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
  """Step-0 (params, model_state): the fresh init, with `loaded` leaves (from
  `load_transfer_source`) in place of the fresh ones; `dont_load` leaves stay fresh."""
  params, model_state = fresh_variables(s)
  if loaded is not None:
    params, model_state = checkpoint.fill_holes(loaded, (params, model_state), s.state_shardings)
  return params, model_state


def switch_phase(old: Setup, new: Setup, state: TrainState) -> TrainState:
  """The state entering phase `new` from phase `old`: optimizer state carried over for the leaves that
  already trained (by path), fresh for the group that joins (see `jtl.phases`)."""
  logging.info("phase %d -> %d at step %d", old.phase.index, new.phase.index, new.phase.start)

  def build(state):
    fresh = new.tx.init(masks.partition(state.params, new.trainable)[0])
    return state.replace(opt_state=phases.carry_over(state.opt_state, fresh))
  logging.info("trainable parameters:\n%s", masks.summary(new.abstract_state.params, new.trainable))
  return jax.jit(build, out_shardings=new.state_shardings)(state)


def initial_state(s: Setup, params: Any, model_state: Any) -> TrainState:
  """A step-0 TrainState around given variables, with optimizer state for the trainable part only."""
  def build(params, model_state):
    opt_state = s.tx.init(masks.partition(params, s.trainable)[0])
    return TrainState(jnp.zeros((), jnp.int32), params, model_state, opt_state)
  return jax.jit(build, out_shardings=s.state_shardings)(params, model_state)


def _resume(config: ml_collections.ConfigDict, workdir: epath.Path, example: Any,
            schedule: list[phases.Phase], mgr: Any) -> tuple[int, Setup, TrainState | None]:
  """(step, setup, restored state) from the newest checkpoint that reads back (`resume.newest`);
  (0, setup, None) without one."""
  def setup_at(step: int) -> Setup:  # the phase that wrote the checkpoint (at a boundary: the earlier)
    return setup(config, example, phases.at(schedule, max(step - 1, 0)))
  found = resume.newest(config, workdir, mgr, setup_at)
  if found is None:
    return 0, setup(config, example, schedule[0]), None
  step, s, restored = found
  state = TrainState(jnp.asarray(step, jnp.int32), **restored)
  return step, s, jax.device_put(state, s.state_shardings)


class _Stopped(Exception):
  """A stop signal came during start-up: nothing to save yet."""


def _check_signal(stage: str) -> None:
  """Between start-up stages: stop now if a signal came (one process; several must agree, and do so
  at the loop's first sync point instead)."""
  if jax.process_count() == 1 and signals.requested():
    raise _Stopped(stage)


def _write_run_files(s: Setup, workdir: epath.Path) -> None:
  """The first writes of a run: the workdir, config.json and params.json (process 0)."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      config_lib.run_config_path(workdir).write_text(s.config.to_json_best_effort(indent=2))
      trainable, frozen = masks.partition(s.abstract_state.params, s.trainable)
      counts = dict(zip(("trainable", "trainable_bytes"), masks.count(trainable)))
      counts.update(zip(("frozen", "frozen_bytes"), masks.count(frozen)))
      (workdir / "params.json").write_text(json.dumps(counts, indent=2))
      hparams.write(workdir, s.config)  # TensorBoard's HParams tab: a row per run (a sweep's cells)
  except OSError as e:
    raise ConfigError(f"cannot write to workdir {workdir} ({e.strerror or e}); choose a writable "
                      "--workdir") from e


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          take_over_lock: bool = False) -> TrainState | None:
  """Runs (or resumes) training in `workdir` (relative, absolute or remote); returns the final state
  (None if a stop signal came during start-up, before there was a state).

  Everything that can be wrong with the input is checked before the workdir is first written. The
  run holds the workdir's lock (jtl/lock.py) from its first write to its end; `take_over_lock` takes
  it even from a holder that looks alive. SIGTERM/SIGINT from the first line on stop the run cleanly
  (`jtl.signals`).
  """
  signals.install()
  try:
    return _train(config, workdir, take_over_lock)
  except _Stopped as e:
    logging.warning("stopped by a signal during start-up (%s), before any step; nothing to save; "
                    "resume by running the same command", e)
    return None
  finally:
    signals.uninstall()


def _train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
           take_over_lock: bool) -> TrainState:
  config = config_lib.prepare(config)
  workdir = epath.Path(config_lib.resolve_path(os.fspath(workdir)))
  cpu_ops.remember_choices(compile_cache.enable(config.get("compilation_cache")))
  data.validate(config.data)
  resume.check_same_experiment(config, workdir)
  schedule = phases.schedule(config)

  def batches_from(step: int) -> Iterator[Any]:
    return data.train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=step,
        process_index=jax.process_index(), process_count=jax.process_count())
  memory.check_config(config)
  example = next(batches_from(0))
  _check_signal("data ready")
  s = setup(config, example, schedule[0])
  loaded = None if checkpoint.completed_steps(workdir) else load_transfer_source(s)
  _check_signal("set up")
  with workdir_lock.hold(workdir, take_over=take_over_lock):
    return _write_and_run(config, workdir, s, example, schedule, loaded, batches_from)


def _step_name(s: Setup, schedule: list[phases.Phase]) -> str:
  return "the train step" + (f" of phase {s.phase.index + 1} of {len(schedule)}"
                             if len(schedule) > 1 else "")


def _write_and_run(config: ml_collections.ConfigDict, workdir: epath.Path, s: Setup, example: Any,
                   schedule: list[phases.Phase], loaded: tuple[Any, Any] | None,
                   batches_from: Callable[[int], Iterator[Any]]) -> TrainState:
  """The part of `train` that writes the workdir (under its lock)."""
  # Validation is over: from here on the workdir is written.
  _write_run_files(s, workdir)
  mgr = checkpoint.manager(workdir, keep=None, cleanup_tmp=True,
                           checksums=config.get("checkpoint_checksums", True))
  try:
    start_step, s, state = _resume(config, workdir, example, schedule, mgr)
    resumed = state is not None
    if state is None:
      resume.no_usable_checkpoint(config, workdir)  # (raises unless there is nothing to lose)
      loaded = loaded if loaded is not None else load_transfer_source(s)
      state = initial_state(s, *init_variables(s, loaded))
    else:
      logging.info("resumed from step %d", start_step)
    _check_signal("restored")
  except BaseException:
    mgr.close()
    raise
  logging.info("trainable parameters:\n%s", masks.summary(s.abstract_state.params, s.trainable))
  writer = MetricWriter(workdir, "train_metrics")
  writer.drop_after(start_step)  # steps a killed run logged past its last checkpoint run again
  keeper = keep.Keeper(mgr, workdir, config.get("keep_checkpoints", 3),
                       verify_newest=config.get("checkpoint_verify", True))
  # A run resumed from its step-0 checkpoint (killed before the next one) has it already.
  if not resumed and config.get("checkpoint_initial", False):
    keeper.save(0, state)  # the starting point, for evaluation (e.g. a transferred model, untrained)
  device_batches = sharding.prefetch_to_mesh(batches_from(start_step), s.batch_sharding)
  try:
    for phase in schedule:
      if phase.end <= int(state.step):
        continue
      if phase.index != s.phase.index:
        next_setup = setup(config, example, phase)
        state = switch_phase(s, next_setup, state)
        s = next_setup
      step_fn = progress.announce_first_call(make_train_step(s), _step_name(s, schedule))
      state = loop.run(config, state, step_fn, device_batches, writer,
                       until=phase.end, keeper=keeper,
                       resumed_from=start_step if start_step else None)
      if int(state.step) < phase.end:  # stopped by a signal
        break
  finally:
    device_batches.close()  # stops the prefetch thread and the data pipeline behind it
    writer.close()
    keeper.finish()
    mgr.close()
  return state
