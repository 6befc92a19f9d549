"""Sweeps: the grid (jtl/sweep.py), the runner (experiments.sweep: a kill mid-grid and a rerun that
skips finished cells and resumes the rest, a failing cell) and the report, checked against a hand
computation from the cells' eval_metrics.jsonl files."""
from __future__ import annotations

import csv
import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jtl import sweep
from jtl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tests/fixtures/sweep_digits.py"
TIMEOUT_S = 900  # a hang guard only: a busy machine may take many times the idle duration


def env():
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          # a few steps on tiny shapes: optimising the programs costs more than running them
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def start(module, *args):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(process):
  out, err = process.communicate(timeout=TIMEOUT_S)
  return process.returncode, out, err


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# --- the grid -------------------------------------------------------------------------------------

def test_dependencies_come_first_and_placeholders_name_workdirs():
  cells = [sweep.Cell("b", config="c.py:pretrain={cell:a}"), sweep.Cell("v", kind="view", of="b",
                                                                         step=0),
           sweep.Cell("a", config="c.py", overrides={"x": "{cell:c}"}), sweep.Cell("c", config="c.py")]
  order = [c.name for c in sweep.check(sweep.Sweep("s", cells))]
  assert order == ["c", "a", "b", "v"]
  assert sweep.command_args(cells[0], "/r") == ["--config=c.py:pretrain=/r/a", "--workdir=/r/b"]
  assert sweep.command_args(cells[2], "/r", ["total_steps=3"]) == [
      "--config=c.py", "--workdir=/r/a", "--config.x=/r/c", "--config.total_steps=3"]
  assert [c.name for c in sweep.select(sweep.check(sweep.Sweep("s", cells)), "^v$")] == [
      "c", "a", "b", "v"]


@pytest.mark.parametrize("cells, message", [
    ([sweep.Cell("a", config="c.py:p={cell:b}"), sweep.Cell("b", config="c.py:p={cell:a}")],
     "cycle: a -> b -> a"),
    ([sweep.Cell("a", config="c.py:p={cell:zz}")], "depends on 'zz'"),
    ([sweep.Cell("a", config="c.py"), sweep.Cell("a", config="c.py")], "two cells are named 'a'"),
    ([sweep.Cell("a/b", config="c.py")], "not a folder name"),
    ([sweep.Cell("a", config="c.py", kind="baseline", baseline="knn")], "unknown baseline 'knn'"),
])
def test_bad_grids_are_one_line_errors(cells, message):
  with pytest.raises(ConfigError, match=message):
    sweep.check(sweep.Sweep("s", cells))


def test_grid_names_cells_by_variant_and_seed():
  cells = sweep.grid("c.py:a=1", {"lr x2": {"optim.lr": 2.0}, "long": "steps=9"}, (0, 1),
                     seed_key="data.shots_seed")
  assert [(c.name, c.variant, c.seed) for c in cells] == [
      ("lr-x2_s0", "lr x2", 0), ("lr-x2_s1", "lr x2", 1), ("long_s0", "long", 0),
      ("long_s1", "long", 1)]
  assert cells[1].overrides == {"optim.lr": 2.0, "data.shots_seed": 1}
  assert cells[2].config == "c.py:a=1,steps=9" and cells[2].overrides == {"data.shots_seed": 0}


# --- the runner and the report, through the CLI ---------------------------------------------------

def lines_of(process):
  """A queue of the process's stdout lines, read by a thread as they come."""
  lines = queue.Queue()

  def pump():
    for line in process.stdout:
      lines.put(line)
    lines.put(None)
  threading.Thread(target=pump, daemon=True).start()
  return lines


def wait_for(lines, text, seen):
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline:
    line = lines.get(timeout=TIMEOUT_S)
    assert line is not None, f"the runner ended before {text!r}:\n{''.join(seen)}"
    seen.append(line)
    if text in line:
      return
  raise AssertionError(f"no {text!r} in time")


def final_rows(root, name, step):
  return [r for r in read_rows(os.path.join(root, name, "eval_metrics.jsonl")) if r["step"] == step]


def assert_report_matches_hand_computation(root):
  """experiments.report on a finished tiny sweep against numpy on the cells' own metrics files."""
  code, out, err = finish(start("experiments.report", f"--workdir={root}"))
  assert code == 0, out + err
  with open(os.path.join(root, "report.csv")) as f:
    table = {(r["variant"], r["metric"]): r for r in csv.DictReader(f)}
  # By hand: the row of the final step (4) of each seed's eval_metrics.jsonl, numpy.
  for variant, key in (("lr 3e-3", "slow"), ("lr 3e-2", "fast")):
    for metric in ("test/accuracy", "test/loss"):
      values = np.array([final_rows(root, f"{key}_s{s}", 4)[0][metric] for s in (0, 1)])
      row = table[(variant, metric)]
      assert int(row["n"]) == 2 and row["seeds"] == "0 1"
      np.testing.assert_allclose([float(row[k]) for k in ("mean", "std", "min", "max")],
                                 [values.mean(), values.std(), values.min(), values.max()],
                                 rtol=1e-12)
      assert f"{values.mean():.3f} ± {values.std():.3f} ({values.min():.3f}–{values.max():.3f})" \
          in out
  pixels = read_rows(os.path.join(root, "pixels-1nn", "eval_metrics.jsonl"))
  assert float(table[("pixels: 1-nearest-neighbour", "test/accuracy")]["mean"]) == \
      pixels[0]["test/accuracy"]
  assert float(table[("fast, step 0", "test/loss")]["mean"]) == \
      final_rows(root, "fast_s0", 0)[0]["test/loss"]
  step0 = final_rows(root, "fast_s0", 0)[0]
  assert float(table[("fast, step 0, accuracy as loss", "test/loss")]["mean"]) == \
      step0["test/accuracy"] != step0["test/loss"]
  with open(os.path.join(root, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(root, "report.md")) as f:
    assert f.read() in out


@pytest.mark.slow
def test_kill_mid_grid_then_rerun_skips_finished_cells_and_the_report_matches(tmp_path):
  from jtl import checkpoint
  root = str(tmp_path / "grid")
  args = (f"--config={TINY}:sweep=tiny", f"--workdir={root}")
  runner = start("experiments.sweep", *args)
  lines, seen = lines_of(runner), []
  wait_for(lines, "done   slow_s0", seen)
  wait_for(lines, "start  slow_s1", seen)
  deadline = time.monotonic() + TIMEOUT_S
  while not checkpoint.completed_steps(os.path.join(root, "slow_s1")):  # slow_s1 is under way
    assert time.monotonic() < deadline and runner.poll() is None, "".join(seen)
    time.sleep(0.05)
  os.killpg(runner.pid, signal.SIGKILL)  # the runner and its cell, as a crash or `kill -9 -PGID`
  runner.wait()
  assert not os.path.exists(os.path.join(root, "slow_s1", "done.json"))
  finished = {f: os.stat(os.path.join(root, "slow_s0", f)).st_mtime_ns
              for f in ("done.json", "eval_metrics.jsonl", "log.txt", "config.json")}

  code, out, err = finish(start("experiments.sweep", *args, "--parallel=2"))
  assert code == 0, out + err
  assert "1 of 7 cells already finished: skipped" in out
  assert "start  slow_s0" not in out and "start  slow_s1" in out
  assert finished == {f: os.stat(os.path.join(root, "slow_s0", f)).st_mtime_ns for f in finished}
  with open(os.path.join(root, "slow_s0", "log.txt")) as f:
    assert f.read().count("=== ") == 1  # one attempt
  with open(os.path.join(root, "slow_s1", "log.txt")) as f:
    assert f.read().count("=== ") == 2  # killed, then resumed
  for name in ("slow_s0", "slow_s1", "fast_s0", "fast_s1"):
    steps = [r["step"] for r in read_rows(os.path.join(root, name, "eval_metrics.jsonl"))]
    assert sorted(steps) == [0, 2, 4], (name, steps)  # every checkpoint evaluated once
  # The console: a line per start and per end of a cell, nothing from the cells themselves.
  assert all(line.startswith(("[", "sweep tiny: 7 cells finished", "1 of 7 cells already"))
             for line in out.splitlines()), out

  assert_report_matches_hand_computation(root)

  # Finished cells whose command would now differ are not mixed into the table: one line, exit 2.
  code, out, err = finish(start("experiments.sweep", *args, "--config.total_steps=6"))
  assert code == 2 and err.startswith("error: cell 'slow_s0'") and len(err.splitlines()) == 1, err


def test_a_failing_cell_stops_the_sweep_with_one_line_naming_it_and_its_log(tmp_path):
  root = str(tmp_path / "broken")
  code, out, err = finish(start("experiments.sweep", f"--config={TINY}:sweep=broken",
                                f"--workdir={root}"))
  log = os.path.join(root, "typo", "log.txt")
  assert code == 3, out + err
  assert err.splitlines() == [err.strip()] and err.startswith("error: cell typo failed (exit 2: "), err
  assert log in err and "optim.lrr" in err
  assert "start  slow_s0" not in out and not os.path.exists(os.path.join(root, "slow_s0"))
  # The report of a sweep with no finished cell: its table of unfinished cells, and no plot.
  code, out, err = finish(start("experiments.report", f"--workdir={root}"))
  assert code == 0 and "Traceback" not in err, out + err
  assert "no report.png (no cell has finished)" in out
  assert os.path.exists(os.path.join(root, "report.md"))
  assert not os.path.exists(os.path.join(root, "report.png"))


def test_unknown_sweep_is_one_line_and_writes_nothing(tmp_path):
  root = tmp_path / "none"
  code, _, err = finish(start("experiments.sweep", f"--config={TINY}:sweep=nope", f"--workdir={root}"))
  assert code == 2 and err == f"error: {TINY}: unknown sweep 'nope'; this config has: tiny, broken\n", err
  assert not root.exists()


# --- the contrastive tables' sweeps (docs/contrastive.md) ----------------------------------------

@functools.lru_cache(maxsize=None)
def config_of(spec):
  """`get_config(arg)` of a cell's `path[:arg]`, as experiments.train loads it (read only)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("sweep_cell_config",
                                                       os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def test_each_contrastive_table_row_reads_the_probe_of_its_shots_and_shots_seed():
  """Every view of simclr_digits.py's sweep renames keys its encoder cell's evaluators write: the
  probe of that row's input (pixels for raw pixels), shots (its column) and shots_seed (its
  seed)."""
  table = sweep.load(f"{ROOT}/experiments/configs/simclr_digits.py:sweep=table")
  by_name = {cell.name: cell for cell in table.cells}
  rows, seeds = {}, {}
  for cell in table.cells:
    if cell.kind != "view":
      continue
    evals = config_of(by_name[cell.of].config).evals
    by_key = {f"test/{e.tag}/{e.type}_accuracy": e for e in evals.values()}
    assert sorted(cell.rename.values()) == ["test/knn_accuracy", "test/linear_probe_accuracy"]
    for source in cell.rename:
      e = by_key[source]  # KeyError: the view reads a key no evaluator writes
      assert (e.input == "pixels") == (cell.variant == "raw pixels"), cell.name
      if cell.column == "0-4, all labels":
        assert e.data.labels == (0, 1, 2, 3, 4) and "shots" not in e.data and cell.seed is None
      else:
        assert e.data.labels == (5, 6, 7, 8, 9)
        assert f"{e.data.shots} shot" in cell.column and e.data.shots_seed == cell.seed
    assert cell.step == (0 if cell.variant.startswith("random init") else None)
    rows.setdefault(cell.variant, set()).add(cell.column)
    seeds.setdefault((cell.variant, cell.column), set()).add(cell.seed)
  assert list(rows) == ["raw pixels", "random init (cnn_small)", "supervised (CE on 0-4)",
                        "SimCLR (0-4)", "SupCon (0-4)"]
  assert all(columns == {"1 shot", "5 shots", "0-4, all labels"} for columns in rows.values())
  assert all(s == ({None} if column.startswith("0-4") else {0, 1, 2})
             for (_, column), s in seeds.items())
  # The random-init row reads step 0 of the SimCLR run: saved, kept and evaluated.
  simclr = by_name["simclr"]
  assert simclr.overrides["checkpoint_initial"] is True
  assert simclr.overrides["keep_checkpoints"] is None
  assert config_of(by_name["supervised"].config).objective == "supervised"
  assert config_of(by_name["supcon"].config).objective == "supcon"


def test_the_chance_row_of_the_two_tower_table_is_the_evaluators_chance_values():
  table = sweep.load(f"{ROOT}/experiments/configs/clip_digits.py:sweep=table")
  by_name = {cell.name: cell for cell in table.cells}
  chance = by_name["chance"]
  assert chance.kind == "view" and chance.step is None
  assert sorted(chance.rename.values()) == sorted(table.metrics)
  assert chance.rename == {f"{m}_chance": m for m in table.metrics}
  clip = by_name[chance.of]
  evals = config_of(clip.config).evals
  types = {m.split("/")[1].split("_")[0] for m in table.metrics}  # zero / retrieval
  assert {"zero", "retrieval"} == types
  for name in ("zero_shot", "retrieval"):
    assert evals[name].type == name and clip.overrides[f"evals.{name}.chance"] is True
  assert {(c.name, c.config) for c in table.cells if c.kind == "train"} == {
      ("clip", "experiments/configs/clip_digits.py:loss=softmax"),
      ("siglip", "experiments/configs/clip_digits.py:loss=sigmoid")}


def test_the_glyph_episode_table_runs_each_learner_at_its_readme_rows_length():
  """episodes_glyphs.py's sweep trains every learner of the README's meta-learning table, with that
  row's training episodes and number of steps, seeds 0, 1, 2 each."""
  table = sweep.load(f"{ROOT}/experiments/configs/episodes_glyphs.py:sweep=table")
  configs = {}
  for cell in table.cells:
    if cell.kind == "train":
      configs.setdefault(cell.config.partition("learner=")[2], {})[cell.seed] = config_of(cell.config)
  assert all(sorted(by_seed) == [0, 1, 2] for by_seed in configs.values())
  readme = open(os.path.join(ROOT, "README.md")).read()
  rows = {  # the README row's start -> learner
      "ProtoNet, 60-way episodes + rotated classes": "protonet60r",
      "ProtoNet, 60-way training episodes": "protonet60",
      "ProtoNet, 20-way training episodes": "protonet",
      "MAML (second order)": "maml",
      "ANIL": "anil",
      "first-order MAML": "fomaml",
  }
  for start, learner in rows.items():
    steps = re.search(rf"^\| {re.escape(start)}, ([\d,]+) steps", readme, re.M)
    assert steps, start
    c = configs[learner][0]
    assert c.total_steps == int(steps.group(1).replace(",", "")), learner
    ways = re.search(r"(\d+)-way", start)
    if ways:
      assert c.data.episodes.ways == int(ways.group(1)), learner
      assert c.data.episodes.rotations == (4 if "rotated" in start else 1), learner
