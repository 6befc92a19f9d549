"""Reliability, in-process: corrupt checkpoints (checksums included), no silent restart, torn metrics
files, non-finite losses, elastic resume, FSDP, and a watching evaluator that never loses a
checkpoint. (Killed processes, signals and full disks: tests/test_kill.py.)"""
import contextlib
import io
import itertools
import json
import os
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import train as train_entry
from jtl import checkpoint, data, evaluate, keep, train
from jtl.errors import ConfigError, NonFiniteError
from jtl.metric_writer import read_jsonl
from jtl.sharding import to_global
from tests.helpers import digits_config, preempt_at


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
  elif how == "flipped bytes":  # inside the biggest params file, its size unchanged
    data_file = max((p for p in pathlib.Path(folder, "params").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
      raw[i] ^= 0x10
    data_file.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated file", "missing item folder", "garbage metadata",
                                 "flipped bytes"])
def test_resume_falls_back_past_a_broken_newest_checkpoint(tmp_path, how, caplog):
  config = digits_config(total_steps=20, checkpoint_every=5, keep_checkpoints=None)  # log_every 5
  final = jax.device_get(train.train(config, str(tmp_path / "straight")))
  short = digits_config(total_steps=20, checkpoint_every=5, keep_checkpoints=None)
  with pytest.MonkeyPatch.context() as patch:
    preempt_at(patch, 15)
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
  preempt_at(monkeypatch, 6)
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
    preempt_at(monkeypatch, 5)
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


def test_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
  """Nothing usable left: one `error:` line, exit 2, the metrics untouched, and the same again on a
  rerun; only `restart_from_scratch` starts over, with the old files set aside, not deleted."""
  workdir = str(tmp_path / "run")
  args = ["experiments.train", "--config=experiments/configs/pretrain_digits.py",
          f"--workdir={workdir}", "--config.total_steps=10", "--config.batch_size=16",
          "--config.log_every=5", "--config.checkpoint_every=5", "--config.model.widths=(8,16)",
          "--config.optim.warmup_steps=2"]

  def run(*extra):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      status = cli.execute(train_entry.define_flags, train_entry.main, args + list(extra))
    return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]
  assert run() == (0, [])
  metrics = (tmp_path / "run" / "train_metrics.jsonl").read_text()
  assert [r["step"] for r in read_jsonl(tmp_path / "run" / "train_metrics.jsonl")] == [5, 10]
  for step in (5, 10):
    damage(workdir, step, "flipped bytes")
  for attempt in range(2):  # the rerun finds only the corrupt-* folders: the same answer
    status, errors = run()
    assert status == 2 and len(errors) == 1, (attempt, status, errors)
    assert "corrupt-5, corrupt-10" in errors[0] and "restart_from_scratch=True" in errors[0]
    assert (tmp_path / "run" / "train_metrics.jsonl").read_text() == metrics
    assert checkpoint.completed_steps(workdir) == []
  assert run("--config.restart_from_scratch=True") == (0, [])
  aside = tmp_path / "run" / "before-restart-1"
  assert (aside / "train_metrics.jsonl").read_text() == metrics
  assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["corrupt-10", "corrupt-5"]
  assert checkpoint.completed_steps(workdir) == [5, 10]
  assert keep.quarantined(workdir) == []


def test_checksums_written_before_the_commit_and_optional(tmp_path):
  """Every file of every item is listed; a checkpoint saved with checksums off has no manifest and
  is read unverified; a damaged file with the manifest raises ChecksumError before anything loads."""
  config = digits_config(total_steps=5, checkpoint_every=5)
  train.train(config, str(tmp_path / "on"))
  folder = pathlib.Path(checkpoint.checkpoint_dir(tmp_path / "on"), "5")
  listed = set(json.loads((folder / checkpoint.MANIFEST).read_text())["crc32"])
  on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
             and p.parent != folder and p.name != "commit_success.txt"}  # (orbax's commit marker)
  assert listed == on_disk and any(name.startswith("params/") for name in listed)
  assert checkpoint.checksum_problem(tmp_path / "on", 5) is None
  damage(tmp_path / "on", 5, "flipped bytes")
  assert "does not match its checksum" in checkpoint.checksum_problem(tmp_path / "on", 5)
  with pytest.raises(ConfigError, match="damaged"):
    checkpoint.load_variables(tmp_path / "on", 5)
  train.train(digits_config(total_steps=5, checkpoint_every=5, checkpoint_checksums=False),
              str(tmp_path / "off"))
  assert not checkpoint.has_manifest(tmp_path / "off", 5)
  assert checkpoint.checksum_problem(tmp_path / "off", 5) is None


def test_nonfinite_right_after_resuming_blames_the_checkpoint_not_the_learning_rate(tmp_path):
  """A checkpoint that holds NaN weights but carries no checksums: the message says the step that
  went bad was the first after resuming from it, and does not call it good."""
  config = digits_config(total_steps=10, checkpoint_every=5, checkpoint_checksums=False)
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  s = train.setup(config, next(batches))
  state = train.initial_state(s, *train.fresh_variables(s))
  poisoned = jax.tree.map(lambda x: x * jnp.nan, state.params)
  mgr = checkpoint.manager(tmp_path, keep=None, async_save=False, checksums=False)
  checkpoint.save(mgr, 5, state.replace(step=jnp.asarray(5), params=poisoned), force=True)
  mgr.close()
  with pytest.raises(NonFiniteError) as e:
    train.train(config, str(tmp_path))
  message = str(e.value)
  assert "step 6" in message and "first step after resuming from checkpoint 5" in message, message
  assert "no checksums" in message and "good" not in message, message


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_by_the_evaluator(tmp_path, caplog):
  config = digits_config(total_steps=10, checkpoint_every=5, log_every=5)
  with pytest.MonkeyPatch.context() as patch:
    preempt_at(patch, 5)
    train.train(config, str(tmp_path))
  evaluate.evaluate_checkpoints(config, str(tmp_path))
  for name in ("train_metrics.jsonl", "eval_metrics.jsonl"):  # a kill in the middle of a write
    with open(tmp_path / name, "a") as f:
      f.write('{"step": 7, "lo')
  assert [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")] == [5]
  train.train(config, str(tmp_path))
  assert [r["step"] for r in read_jsonl(tmp_path / "train_metrics.jsonl")] == [5, 10]
  rows = evaluate.evaluate_checkpoints(config, str(tmp_path))
  assert [r["step"] for r in rows] == [10]
  assert [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")] == [5, 10]
  assert "partial line" in caplog.text


def test_keep_checkpoints_none_from_the_command_line_keeps_all(tmp_path):
  args = ["experiments.train", "--config=experiments/configs/pretrain_digits.py",
          f"--workdir={tmp_path}", "--config.total_steps=20", "--config.batch_size=16",
          "--config.log_every=5", "--config.checkpoint_every=4", "--config.model.widths=(8,16)",
          "--config.optim.warmup_steps=2", "--config.keep_checkpoints=None"]
  assert cli.execute(train_entry.define_flags, train_entry.main, args) == 0
  assert checkpoint.completed_steps(tmp_path) == [4, 8, 12, 16, 20]
  assert json.loads((tmp_path / "config.json").read_text())["keep_checkpoints"] is None


def test_skip_nonfinite_updates_is_bit_identical_while_nothing_is_skipped():
  """The guard must not change a single bit of a healthy run (its advice is to rerun with it on)."""
  def run(skip):
    config = digits_config(skip_nonfinite_updates=skip)
    batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    first = next(batches)
    s = train.setup(config, first)
    state = train.initial_state(s, *train.fresh_variables(s))
    step = train.make_train_step(s)
    for batch in itertools.islice(itertools.chain([first], batches), 20):
      state, metrics = step(state, to_global(batch, s.batch_sharding))
    return jax.device_get((state, metrics.get("skipped", 0.0)))
  (plain, _), (guarded, skipped) = run(0), run(3)
  assert float(skipped) == 0.0
  assert_trees_equal(plain, guarded)


def test_an_evaluator_started_with_the_trainer_evaluates_every_checkpoint_once(tmp_path, monkeypatch):
  """`--watch` started in the same second as the trainer, keep 2, a checkpoint every 5 steps. The
  evaluator's set-up is held back until the trainer has written 3 checkpoints (the slow case): it
  registered before its set-up, so nothing is deleted under it; afterwards only `keep` are left."""
  config = digits_config(total_steps=30, checkpoint_every=5, keep_checkpoints=2, log_every=5)
  real_setup = evaluate.setup_for_eval

  def slow_setup(*args, **kwargs):
    deadline = time.monotonic() + 300
    while len(checkpoint.completed_steps(tmp_path)) < 3 and time.monotonic() < deadline:
      time.sleep(0.05)
    return real_setup(*args, **kwargs)
  monkeypatch.setattr(evaluate, "setup_for_eval", slow_setup)
  watcher = threading.Thread(target=evaluate.evaluate_checkpoints, args=(config, str(tmp_path)),
                             kwargs=dict(watch=True, timeout=600, poll_every=0.05), daemon=True)
  watcher.start()
  train.train(config, str(tmp_path))
  watcher.join(timeout=300)
  assert not watcher.is_alive()
  steps = [r["step"] for r in read_jsonl(tmp_path / "eval_metrics.jsonl")]
  assert steps == list(range(5, 31, 5)), steps
  assert checkpoint.completed_steps(tmp_path) == [25, 30]  # the keep policy caught up
  assert not (tmp_path / keep.EVALUATOR_FILE).exists()
