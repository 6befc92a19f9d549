"""Run a sweep declared in a config file: every cell in its own process, resumable, one line per cell.

  python -m experiments.sweep --config=experiments/configs/transfer_digits.py:sweep=table \
      --workdir=runs/transfer_table [--parallel=2] [--config.total_steps=20 ...] [--list]

Each cell (see jtl/sweep.py) runs as `python -m experiments.cell` (train then evaluate, or a raw-pixel
baseline) in ROOT/<cell>/, its output in ROOT/<cell>/log.txt; the console gets one line when a cell
starts and one when it ends. A cell waits for the cells it names (`{cell:NAME}`). `--config.KEY=VALUE`
is passed to every train and baseline cell, after the cell's own overrides (e.g. fewer steps for a
quick look).

Rerunning the same command resumes: finished cells (trained and evaluated at their final step;
ROOT/<cell>/done.json) are skipped, unfinished ones resume from their newest checkpoint. A finished
cell whose command would now differ (another override, a changed sweep) stops the runner with an
error rather than being mixed into one table: use another --workdir, or delete that cell's folder.
A failing cell stops the sweep with one line naming the cell and its log (exit 3; the cells already
running are stopped, their checkpoints kept). SIGTERM/SIGINT stop the running cells the same way.
Then `python -m experiments.report --workdir=ROOT` writes the table.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from absl import flags

from experiments import tool
from jtl import sweep as sweep_lib
from jtl.errors import ConfigError, RunError

EXIT_BAD_INPUT, EXIT_CELL_FAILED, EXIT_STOPPED = tool.EXIT_BAD_INPUT, 3, 4
_OVERRIDE = re.compile(r"--config\.([\w.]+)=(.*)", re.S)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("config", None, "path.py:sweep=NAME: the sweep `get_sweep(NAME)` of a config "
                      "file.", flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The sweep's root: one folder per cell.",
                      flag_values=flag_values)
  flags.DEFINE_integer("parallel", 1, "Cells run at once.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_string("only", None, "Run only the cells whose name matches this regex (re.search), "
                      "and the cells they depend on.", flag_values=flag_values)
  flags.DEFINE_bool("list", False, "Print the cells, their state and commands; run nothing.",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without `--config.KEY=VALUE`, those as `KEY=VALUE`): they go to the cells."""
  rest, overrides = [], []
  for arg in argv:
    match = _OVERRIDE.fullmatch(arg)
    if match:
      overrides.append(f"{match[1]}={match[2]}")
    else:
      rest.append(arg)
  return rest, overrides


class Cells:
  """The cells of one sweep under one root: their specs, what is finished, how to run one."""

  def __init__(self, sweep: sweep_lib.Sweep, root: str, overrides: list[str],
               only: str | None = None):
    self.sweep, self.root, self.overrides = sweep, root, overrides
    self.order = sweep_lib.check(sweep)
    if only is not None:
      self.order = sweep_lib.select(self.order, only)
    self.index = {cell.name: i + 1 for i, cell in enumerate(self.order)}

  def folder(self, cell: sweep_lib.Cell) -> str:
    return os.path.join(self.root, cell.name)

  def command(self, cell: sweep_lib.Cell) -> list[str]:
    if cell.kind == "view":
      return []
    args = sweep_lib.command_args(cell, self.root, self.overrides)
    if cell.kind == "baseline":
      args += ["--kind=baseline", f"--baseline={cell.baseline}"]
    return [sys.executable, "-m", "experiments.cell", *args]

  def spec(self, cell: sweep_lib.Cell) -> dict[str, Any]:
    """What defines the cell's result: a finished cell is reused only if this is unchanged."""
    spec = {"sweep": self.sweep.name, "cell": cell.to_json(), "command": self.command(cell)[1:]}
    return json.loads(json.dumps(spec))  # as done.json reads back (tuples become lists)

  def finished(self, cell: sweep_lib.Cell) -> bool:
    """True if done.json records this very spec; ConfigError if it records another."""
    path = os.path.join(self.folder(cell), "done.json")
    if not os.path.exists(path):
      return False
    with open(path) as f:
      done = json.load(f)
    if done.get("spec") != self.spec(cell):
      raise ConfigError(
          f"cell {cell.name!r} in {self.root} was finished with other settings (command "
          f"{' '.join(done.get('spec', {}).get('command', []))!r}); use another --workdir, or "
          f"delete {self.folder(cell)} to run it again")
    return True

  def final_row(self, cell: sweep_lib.Cell) -> dict[str, Any] | None:
    """The cell's evaluation row at its final step (None if that step is not evaluated yet)."""
    from jtl.metric_writer import read_jsonl  # pylint: disable=g-import-not-at-top (imports jax)
    rows = read_jsonl(os.path.join(self.folder(cell), "eval_metrics.jsonl"))
    if cell.kind == "train":
      with open(os.path.join(self.folder(cell), "config.json")) as f:
        total_steps = json.load(f)["total_steps"]
      rows = [row for row in rows if row["step"] == total_steps]
    return rows[-1] if rows else None

  def mark_done(self, cell: sweep_lib.Cell, row: dict[str, Any], seconds: float) -> None:
    record = {"spec": self.spec(cell), "final": row, "seconds": round(seconds, 1)}
    path = os.path.join(self.folder(cell), "done.json")
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)  # done.json is whole or absent, whatever kills us

  def prepare(self, cell: sweep_lib.Cell) -> None:
    os.makedirs(self.folder(cell), exist_ok=True)
    with open(os.path.join(self.folder(cell), "cell.json"), "w") as f:
      json.dump(self.spec(cell), f, indent=1)

  def run_view(self, cell: sweep_lib.Cell) -> dict[str, Any]:
    """A view cell: the source cell's row at `cell.step`, keys renamed, as its own metrics file."""
    from jtl.metric_writer import read_jsonl  # pylint: disable=g-import-not-at-top
    source = os.path.join(self.root, cell.of, "eval_metrics.jsonl")
    rows = sorted(read_jsonl(source), key=lambda row: row["step"])
    rows = rows[-1:] if cell.step is None else [row for row in rows if row["step"] == cell.step]
    if not rows:
      raise RunError(f"cell {cell.name}: {source} has no row for step {cell.step}; is step "
                     f"{cell.step} checkpointed and evaluated in cell {cell.of}?")
    # A renamed key replaces a source key of the same name (a chance or pixel row's values become
    # the table's metrics), whichever comes first in the source row.
    row = {key: value for key, value in rows[-1].items() if key not in cell.rename.values()}
    row.update({cell.rename[key]: value for key, value in rows[-1].items() if key in cell.rename})
    with open(os.path.join(self.folder(cell), "eval_metrics.jsonl"), "w") as f:
      f.write(json.dumps(row) + "\n")
    return row

  def write_index(self) -> None:
    """ROOT/sweep.json: what the report reads (cells in table order, default metrics)."""
    index = {"sweep": self.sweep.name, "title": self.sweep.title, "config": FLAGS.config,
             "metrics": list(self.sweep.metrics), "overrides": self.overrides,
             "cells": [cell.to_json() for cell in self.sweep.cells]}
    with open(os.path.join(self.root, "sweep.json"), "w") as f:
      json.dump(index, f, indent=1)


def _summary(row: dict[str, Any], metrics: tuple[str, ...]) -> str:
  shown = [f"{k}={row[k]:.4g}" for k in metrics if isinstance(row.get(k), (int, float))]
  return " ".join(shown)


def _error_line(log_path: str) -> str:
  """The last `error:` line of a cell's log, or its last line."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or [""])[-1][:300]


class Runner:
  """Starts cells whose dependencies are finished, up to `parallel` at once, until all are done."""

  def __init__(self, cells: Cells, parallel: int):
    self.cells, self.parallel = cells, parallel
    self.running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    self.stop_signal: int | None = None

  def say(self, cell: sweep_lib.Cell, what: str) -> None:
    """One console line about a cell: `[i/n] what`."""
    n = len(self.cells.order)
    print(f"[{self.cells.index[cell.name]:>{len(str(n))}}/{n}] {what}", flush=True)

  def start(self, cell: sweep_lib.Cell) -> None:
    self.cells.prepare(cell)
    log_path = os.path.join(self.cells.folder(cell), "log.txt")
    log = open(log_path, "a")  # pylint: disable=consider-using-with (closed in finish)
    command = self.cells.command(cell)
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command[1:])}\n")
    log.flush()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               stdin=subprocess.DEVNULL)
    self.running[cell.name] = (process, time.time(), log)
    self.say(cell, f"start  {cell.name}")

  def finish(self, cell: sweep_lib.Cell, returncode: int) -> None:
    process, started, log = self.running.pop(cell.name)
    del process
    log.close()
    log_path = os.path.join(self.cells.folder(cell), "log.txt")
    if self.stop_signal is not None:
      return
    if returncode != 0:
      self.fail(cell, f"failed (exit {returncode}"
                + (f": {_error_line(log_path)}" if _error_line(log_path) else "") + ")")
    row = self.cells.final_row(cell)
    if row is None:
      self.fail(cell, "exited 0 without an evaluation of its final step")
    seconds = time.time() - started
    self.cells.mark_done(cell, row, seconds)
    self.say(cell, f"done   {cell.name} {seconds:.0f}s {_summary(row, self.cells.sweep.metrics)}")

  def fail(self, cell: sweep_lib.Cell, why: str) -> None:
    self.stop_running()
    log_path = os.path.join(self.cells.folder(cell), "log.txt")
    raise RunError(f"cell {cell.name} {why}; its log: {log_path} (rerun the same command to resume "
                   "the sweep)")

  def stop_running(self) -> None:
    """SIGTERM to the running cells (each saves a checkpoint and exits), then waits for them."""
    for process, _, _ in self.running.values():
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    for name in list(self.running):
      process, _, log = self.running.pop(name)
      try:
        process.wait(timeout=300)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
      log.close()

  def run(self) -> None:
    pending = [cell for cell in self.cells.order if not self.cells.finished(cell)]
    done = {cell.name for cell in self.cells.order} - {cell.name for cell in pending}
    if done:
      print(f"{len(done)} of {len(self.cells.order)} cells already finished: skipped", flush=True)
    by_name = {cell.name: cell for cell in self.cells.order}
    while pending or self.running:
      if self.stop_signal is not None:
        self.stop_running()
        raise StopRequested(self.stop_signal)
      for cell in list(pending):
        if not all(dep in done for dep in cell.dependencies()):
          continue
        if cell.kind == "view":  # no process: a row copied from another cell
          pending.remove(cell)
          self.cells.prepare(cell)
          try:
            row = self.cells.run_view(cell)
          except RunError:
            self.stop_running()
            raise
          self.cells.mark_done(cell, row, 0.0)
          done.add(cell.name)
          self.say(cell, f"done   {cell.name} (step {row['step']} of {cell.of}) "
                   f"{_summary(row, self.cells.sweep.metrics)}")
          continue
        if len(self.running) < self.parallel:
          pending.remove(cell)
          self.start(cell)
      for name in list(self.running):
        returncode = self.running[name][0].poll()
        if returncode is not None:
          self.finish(by_name[name], returncode)
          done.add(name)
      time.sleep(0.2)


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow (config files import it) with its C++ start-up notices (absl, oneDNN), which
  bypass Python's stderr, sent to /dev/null: the runner's console is its own lines; the cells' logs
  keep theirs."""
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


class StopRequested(Exception):
  """SIGTERM or SIGINT reached the runner: running cells were stopped (their checkpoints kept)."""


FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
  del argv
  start = time.time()
  _import_tensorflow_quietly()
  try:
    sweep = sweep_lib.load(FLAGS.config)
    if not FLAGS.workdir or "://" in FLAGS.workdir:
      raise ConfigError(f"--workdir={FLAGS.workdir!r}: the sweep's root must be a local folder")
    root = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    cells = Cells(sweep, root, OVERRIDES, FLAGS.only)
    states = {cell.name: cells.finished(cell) for cell in cells.order}  # a mismatch stops here
  except ConfigError as e:
    return tool.bad_input(e)
  if FLAGS.list:
    for cell in cells.order:
      state = "finished" if states[cell.name] else (
          "started" if os.path.exists(os.path.join(cells.folder(cell), "cell.json")) else "to run")
      what = " ".join(cells.command(cell)[3:]) or (
          f"view of {cell.of} at step {'(last)' if cell.step is None else cell.step}")
      print(f"{cell.name:<40} {state:<9} {what}")
    return 0
  os.makedirs(root, exist_ok=True)
  cells.write_index()
  runner = Runner(cells, FLAGS.parallel)

  def on_signal(signum, frame):
    del frame
    runner.stop_signal = signum
  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  try:
    runner.run()
  except RunError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_CELL_FAILED
  except StopRequested:
    print("sweep stopped by a signal; running cells saved their checkpoints; rerun the same "
          "command to resume", file=sys.stderr, flush=True)
    return EXIT_STOPPED
  print(f"sweep {sweep.name}: {len(cells.order)} cells finished ({time.time() - start:.0f}s); table: "
        f"python -m experiments.report --workdir={FLAGS.workdir}", flush=True)
  return 0


OVERRIDES: list[str] = []


def run() -> None:
  """`__main__`: the `--config.KEY=VALUE` overrides are set aside for the cells, the rest parsed."""
  global OVERRIDES
  argv, OVERRIDES = split_overrides(sys.argv)
  tool.run(define_flags, main, argv)


if __name__ == "__main__":
  run()
