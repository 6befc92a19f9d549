"""Reliability, in-process: corrupt checkpoints, non-finite losses, elastic resume, FSDP, and a watching
evaluator that never loses a checkpoint. (Killed processes: tests/test_kill.py.)"""
import contextlib
import io
import itertools
import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import train as train_entry
from jtl import checkpoint, data, evaluate, keep, train
from jtl.errors import NonFiniteError
from jtl.metric_writer import read_jsonl
from jtl.sharding import to_global
from tests.helpers import digits_config


def variables(workdir, step=None):
  return checkpoint.load_variables(workdir, step)


def assert_trees_equal(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tolerance:
      np.testing.assert_allclose(x, y, **tolerance)
    else:
      np.testing.assert_array_equal(x, y)


def damage(workdir, step, how):
  folder = checkpoint.checkpoint_dir(workdir) / str(step)
  if how == "truncated file":  # every data file of the params, cut short
    for data_file in [*(folder / "params").glob("d/*"), *(folder / "params").glob("ocdbt.*/d/*")]:
      data_file.write_bytes(data_file.read_bytes()[:7])
  elif how == "missing item folder":
    (folder / "opt_state").rmtree()
  elif how == "garbage metadata":
    (folder / "_CHECKPOINT_METADATA").write_text("{not json")


@pytest.mark.parametrize("how", ["truncated file", "missing item folder", "garbage metadata"])
def test_resume_falls_back_past_a_broken_newest_checkpoint(tmp_path, how, caplog):
  config = digits_config(total_steps=20, checkpoint_every=5, keep_checkpoints=None)  # log_every 5
  final = jax.device_get(train.train(config, str(tmp_path / "straight")))
  short = digits_config(total_steps=20, checkpoint_every=5, keep_checkpoints=None)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train._StopFlag, "should_stop", lambda self, step: step == 15)
    train.train(short, str(tmp_path / "run"))
  assert checkpoint.completed_steps(tmp_path / "run") == [5, 10, 15]
  damage(tmp_path / "run", 15, how)
  # The evaluator skips it with a warning and does not record it.
  rows = evaluate.evaluate_checkpoints(short, str(tmp_path / "run"))
  assert [r["step"] for r in rows] == [5, 10]
  assert "15" in caplog.text and "broken" in caplog.text
  # Resuming falls back to step 10, moves 15 aside, and still ends where an uninterrupted run ends.
  resumed = jax.device_get(train.train(short, str(tmp_path / "run")))
  assert (checkpoint.checkpoint_dir(tmp_path / "run") / "corrupt-15").exists()
  assert_trees_equal((final.params, final.model_state), (resumed.params, resumed.model_state))
  logged = [r["step"] for r in read_jsonl(tmp_path / "run" / "train_metrics.jsonl")]
  assert logged == [5, 10, 15, 20], logged  # every step logged once, 15 by the resumed run


def test_keep_policy_never_deletes_the_last_good_checkpoint_for_a_bad_one(tmp_path):
  config = digits_config(total_steps=10, checkpoint_every=5, keep_checkpoints=1)
  train.train(config, str(tmp_path))
  assert checkpoint.completed_steps(tmp_path) == [10]
  # A newer checkpoint that is broken (written, then damaged) must not cost step 10.
  mgr = checkpoint.manager(tmp_path, keep=None, async_save=False)
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  s = train.setup(config, next(batches))
  checkpoint.save(mgr, 15, train.initial_state(s, *train.fresh_variables(s)), force=True)
  damage(tmp_path, 15, "truncated file")
  keep.Keeper(mgr, tmp_path, keep=1).prune()
  mgr.close()
  assert checkpoint.completed_steps(tmp_path) == [10]
  assert (checkpoint.checkpoint_dir(tmp_path) / "corrupt-15").exists()


def nan_at(step_with_nan):
  """A train_iterator wrapper whose batch for update `step_with_nan` (0-based) holds a NaN pixel."""
  real = data.train_iterator

  def iterator(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
      if step == step_with_nan:
        batch = {**batch, "image": batch["image"].copy()}
        batch["image"][0, 0, 0, 0] = np.nan
      yield batch
  return iterator


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                               monkeypatch):
  monkeypatch.setattr(data, "train_iterator", nan_at(7))
  config = digits_config(total_steps=20, checkpoint_every=4, log_every=10)
  with pytest.raises(NonFiniteError) as e:
    train.train(config, str(tmp_path))
  message = str(e.value)
  assert "step 8" in message and "loss=nan" in message and "last good checkpoint is step 4" in message
  assert "\n" not in message
  assert checkpoint.completed_steps(tmp_path) == [4]
  _, saved = variables(tmp_path)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved))


def test_nonfinite_loss_from_the_cli_is_exit_status_3_and_one_error_line(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "train_iterator", nan_at(7))
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(train_entry.define_flags, train_entry.main, [
        "train", "--config=experiments/configs/pretrain_digits.py", f"--workdir={tmp_path}",
        "--config.total_steps=20", "--config.batch_size=16", "--config.checkpoint_every=4",
        "--config.log_every=10", "--config.model.widths=(8,16)", "--config.optim.warmup_steps=2"])
  errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
  assert status == 3, err.getvalue()[-2000:]  # README: a failed run, not bad input (2)
  assert len(errors) == 1 and "step 8" in errors[0] and "loss=nan" in errors[0], errors
  assert checkpoint.completed_steps(tmp_path) == [4]


def test_skip_nonfinite_updates_refuses_the_update_and_counts_it(tmp_path, monkeypatch):
  config = digits_config(total_steps=12, checkpoint_every=100, log_every=4,
                         skip_nonfinite_updates=3)
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  s = train.setup(config, next(batches))
  state = train.initial_state(s, *train.fresh_variables(s))
  step = train.make_train_step(s)
  batch = next(batches)
  poisoned = {**batch, "image": batch["image"].copy()}
  poisoned["image"][3, 2, 2, 0] = np.inf
  before = jax.device_get(state)
  after, metrics = step(state, to_global(poisoned, s.batch_sharding))
  after = jax.device_get(after)
  assert float(metrics["skipped"]) == 1.0 and int(after.step) == int(before.step) + 1
  assert_trees_equal((before.params, before.model_state, before.opt_state),
                     (after.params, after.model_state, after.opt_state))
  # Through the trainer: one poisoned batch is skipped and counted; the run finishes.
  monkeypatch.setattr(data, "train_iterator", nan_at(5))
  train.train(config, str(tmp_path))
  rows = read_jsonl(tmp_path / "train_metrics.jsonl")
  assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
  assert all(np.isfinite(r["loss"]) for r in rows)


def test_skip_nonfinite_stops_after_n_in_a_row(tmp_path):
  config = digits_config(total_steps=30, checkpoint_every=100, log_every=5,
                         skip_nonfinite_updates=3, optim__name="sgd", optim__lr=1e30,
                         optim__warmup_steps=0)
  with pytest.raises(NonFiniteError, match="3 updates in a row"):
    train.train(config, str(tmp_path))


@pytest.mark.parametrize("first, second", [(8, 1), (1, 8)])
def test_elastic_resume_on_a_different_device_count(tmp_path, first, second, monkeypatch):
  """A run stopped on `first` devices resumes on `second` with the same global batch and ends within
  float tolerance of an uninterrupted run (reductions over a different number of devices sum in a
  different order, so not bit-identical)."""
  straight = jax.device_get(train.train(digits_config(total_steps=12, mesh__axes=(("data", first),)),
                                        str(tmp_path / "straight")))
  monkeypatch.setattr(train._StopFlag, "should_stop", lambda self, step: step == 6)
  train.train(digits_config(total_steps=12, mesh__axes=(("data", first),)), str(tmp_path / "run"))
  monkeypatch.undo()
  resumed = jax.device_get(train.train(digits_config(total_steps=12, mesh__axes=(("data", second),)),
                                       str(tmp_path / "run")))
  assert_trees_equal((straight.params, straight.model_state), (resumed.params, resumed.model_state),
                     rtol=1e-4, atol=1e-5)


def test_fsdp_equals_replicated_with_less_memory_per_device_and_checkpoints_cross_over(tmp_path,
                                                                                     monkeypatch):
  fsdp = dict(mesh__rules=((".*", "fsdp"),), mesh__fsdp_min_size=256)
  results, memory = {}, {}
  for name, extra in (("replicated", {}), ("fsdp", fsdp)):
    config = digits_config(model__widths=(32, 64), **extra)
    batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    first = next(batches)
    s = train.setup(config, first)
    kernel = s.state_shardings.params["backbone"]["stage2"]["conv"]["kernel"]
    assert ("data" in kernel.spec) == (name == "fsdp"), kernel.spec
    state = train.initial_state(s, *train.fresh_variables(s))
    step = train.make_train_step(s)
    compiled = step.lower(s.abstract_state, s.abstract_batch).compile()
    memory[name] = compiled.memory_analysis().argument_size_in_bytes
    for batch in itertools.islice(itertools.chain([first], batches), 3):
      state, _ = step(state, to_global(batch, s.batch_sharding))
    results[name] = jax.device_get((state.params, state.opt_state))
  # Adam amplifies the float rounding of a different reduction order on near-zero gradients.
  assert_trees_equal(results["replicated"], results["fsdp"], rtol=1e-4, atol=1e-5)
  assert memory["fsdp"] < 0.5 * memory["replicated"], memory
  # A checkpoint written under FSDP resumes replicated, and the reverse.
  for writer, reader in ((fsdp, {}), ({}, fsdp)):
    workdir = tmp_path / f"{bool(writer)}"
    monkeypatch.setattr(train._StopFlag, "should_stop", lambda self, step: step == 5)
    train.train(digits_config(total_steps=10, **writer), str(workdir))
    monkeypatch.undo()
    resumed = jax.device_get(train.train(digits_config(total_steps=10, **reader), str(workdir)))
    straight = jax.device_get(train.train(digits_config(total_steps=10), str(tmp_path / "s")))
    assert_trees_equal(straight.params, resumed.params, rtol=1e-4, atol=1e-5)


def test_a_watching_evaluator_never_loses_a_checkpoint(tmp_path):
  """A fast trainer (a checkpoint every 4 steps, keep 2) beside `--watch`: every checkpoint is
  evaluated, because the keep policy keeps the ones the evaluator has not reached."""
  config = digits_config(total_steps=60, checkpoint_every=4, keep_checkpoints=2, log_every=4)
  watcher = threading.Thread(target=evaluate.evaluate_checkpoints, args=(config, str(tmp_path)),
                             kwargs=dict(watch=True, timeout=600, poll_every=0.05), daemon=True)
  # The evaluator announces itself before the trainer starts, as a watcher started first would.
  keep.report_evaluator_progress(tmp_path, -1)
  watcher.start()
  train.train(config, str(tmp_path))
  watcher.join(timeout=300)
  assert not watcher.is_alive()
  steps = [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")]
  assert steps == list(range(4, 61, 4)), steps
  assert not (tmp_path / keep.EVALUATOR_FILE).exists()
