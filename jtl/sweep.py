"""Sweeps declared in config files: named grids of cells, each one run in its own workdir.

A config file declares its sweeps with `get_sweep(name)` beside `get_config(arg)` (big_vision keeps
its grids in the config file the same way):

  def get_sweep(name):
    if name != "lr":
      raise ValueError(f"unknown sweep {name!r}; this config has: lr")
    return sweep.Sweep(name, metrics=("test/accuracy",), cells=sweep.grid(
        "experiments/configs/pretrain_digits.py",
        variants={"lr 1e-3": {"optim.lr": 1e-3}, "lr 3e-3": {"optim.lr": 3e-3}},
        seeds=(0, 1, 2)))

and `python -m experiments.sweep --config=experiments/configs/X.py:sweep=lr --workdir=ROOT` runs it
(ROOT/<cell>/ per cell); `python -m experiments.report --workdir=ROOT` tabulates it.

A cell is one of three kinds:
  train     `experiments.train` then `experiments.evaluate` on `config` (+ `overrides`);
  baseline  `jtl.baselines` (`baseline=` one of its NAMES) fitted on `config`'s data, written as an
            evaluation row of the eval split (`test/accuracy`), so the report shows it as a row;
  view      no process: the row of another cell's `eval_metrics.jsonl` at `step` (None: its last;
            keys renamed by `rename`, a renamed key replacing the source's key of that name),
            e.g. the zero-shot accuracy a transfer run measures at its step 0, or one run shown in
            several columns.
`{cell:NAME}` inside `config` or an override value stands for the absolute workdir of cell NAME and
makes this cell wait for that one (`after` adds more such dependencies).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jtl.errors import ConfigError

KINDS = ("train", "baseline", "view")
PLACEHOLDER = re.compile(r"\{cell:([^{}]+)\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a sweep.

  name      its folder under the sweep's root (letters, digits, `._+-`);
  variant   the report row it belongs to (cells of one variant and column differ by seed only);
  config    `path[:arg]` of the config file (train, baseline); may hold `{cell:NAME}`;
  overrides `{key: value}` passed as `--config.key=value`; values may hold `{cell:NAME}`;
  seed      the seed's value (for the report; the overrides set it);
  column    the report column (e.g. "1 shot"); "" for a table with one column per metric;
  section   a heading row the report puts above the first variant of each section;
  report    False: run it (e.g. a pretraining other cells need) but leave it out of the table;
  kind      train | baseline | view (see the module docstring);
  baseline  for kind=baseline: a `jtl.baselines.NAMES` entry;
  of, step, rename   for kind=view: the source cell, its evaluated step (None: the last one),
            metric keys to rename;
  after     names of cells that must finish first (besides the `{cell:NAME}` ones).
  """
  name: str
  variant: str = ""
  config: str = ""
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed: int | None = None
  column: str = ""
  section: str = ""
  report: bool = True
  kind: str = "train"
  baseline: str = ""
  of: str = ""
  step: int | None = None
  rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
  after: tuple[str, ...] = ()

  def dependencies(self) -> list[str]:
    """The cells this one waits for, in order of first mention."""
    found = list(self.after) + ([self.of] if self.kind == "view" else [])
    for text in [self.config, *map(str, self.overrides.values())]:
      found += PLACEHOLDER.findall(text)
    return list(dict.fromkeys(found))

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["overrides"], out["rename"] = dict(self.overrides), dict(self.rename)
    out["after"] = list(self.after)
    return out


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A named grid: its cells in table order and the metrics its report shows by default."""
  name: str
  cells: tuple[Cell, ...]
  metrics: tuple[str, ...] = ("test/accuracy",)
  title: str = ""

  def __post_init__(self):
    object.__setattr__(self, "cells", tuple(self.cells))
    object.__setattr__(self, "metrics", tuple(self.metrics))


def grid(config: str, variants: Mapping[str, Mapping[str, Any] | str], seeds: Iterable[int], *,
         seed_key: str = "seed", column: str = "", section: str = "", prefix: str = "",
         keys: Mapping[str, str] | None = None) -> list[Cell]:
  """Train cells for every variant × seed.

  A variant is `{override key: value}`, or a string of config-file arguments appended to `config`'s
  (`"mode=finetune,backbone_lr=0.1"`). Each seed sets `seed_key` (an override key). Cell names are
  `<prefix><key>_s<seed>`, with `key` from `keys[variant]` or the variant name made safe.
  """
  cells = []
  for variant, spec in variants.items():
    key = (keys or {}).get(variant) or slug(variant)
    for seed in seeds:
      overrides = dict(spec) if isinstance(spec, Mapping) else {}
      overrides[seed_key] = seed
      cells.append(Cell(name=f"{prefix}{key}_s{seed}", variant=variant, seed=seed,
                        config=config if isinstance(spec, Mapping) else with_args(config, spec),
                        overrides=overrides, column=column, section=section))
  return cells


def with_args(config: str, args: str) -> str:
  """`path[:a]` with `args` appended to its argument string: `path:a,args`."""
  if not args:
    return config
  return f"{config},{args}" if ":" in config else f"{config}:{args}"


def slug(text: str) -> str:
  """`text` as a folder name: runs of other characters become one `-`."""
  return re.sub(r"[^A-Za-z0-9._+]+", "-", text).strip("-.").lower() or "cell"


def check(sweep: Sweep) -> list[Cell]:
  """The cells in an order that runs every dependency first (stable: table order otherwise).

  Raises ConfigError for a bad grid: duplicate or unsafe names, an unknown kind, baseline or
  dependency, a cycle.
  """
  from jtl import baselines  # pylint: disable=g-import-not-at-top (its NAMES; no TensorFlow)
  by_name: dict[str, Cell] = {}
  for cell in sweep.cells:
    if not _NAME.fullmatch(cell.name):
      raise ConfigError(f"sweep {sweep.name!r}: cell name {cell.name!r} is not a folder name; use "
                        "letters, digits and ._+-")
    if cell.name in by_name:
      raise ConfigError(f"sweep {sweep.name!r}: two cells are named {cell.name!r}; names must be "
                        "unique (they are folders)")
    if cell.kind not in KINDS:
      raise ConfigError(f"cell {cell.name!r}: unknown kind {cell.kind!r}; use one of "
                        f"{', '.join(KINDS)}")
    if cell.kind in ("train", "baseline") and not cell.config:
      raise ConfigError(f"cell {cell.name!r}: no config; give config='path.py[:args]'")
    if cell.kind == "baseline" and cell.baseline not in baselines.NAMES:
      raise ConfigError(f"cell {cell.name!r}: unknown baseline {cell.baseline!r}; use one of "
                        f"{', '.join(baselines.NAMES)}")
    if cell.kind == "view" and not cell.of:
      raise ConfigError(f"cell {cell.name!r}: a view needs of=<cell name> (and step=<int>, or None "
                        "for the last evaluated step)")
    by_name[cell.name] = cell
  for cell in sweep.cells:
    for dep in cell.dependencies():
      if dep not in by_name:
        raise ConfigError(f"cell {cell.name!r} depends on {dep!r}, which is not a cell of sweep "
                          f"{sweep.name!r}")
  ordered: list[Cell] = []
  state: dict[str, str] = {}

  def visit(cell: Cell, path: tuple[str, ...]) -> None:
    if state.get(cell.name) == "done":
      return
    if state.get(cell.name) == "visiting":
      raise ConfigError(f"sweep {sweep.name!r}: cells depend on each other in a cycle: "
                        f"{' -> '.join(path + (cell.name,))}")
    state[cell.name] = "visiting"
    for dep in cell.dependencies():
      visit(by_name[dep], path + (cell.name,))
    state[cell.name] = "done"
    ordered.append(cell)

  for cell in sweep.cells:
    visit(cell, ())
  return ordered


def select(ordered: Sequence[Cell], pattern: str) -> list[Cell]:
  """The cells (of a `check`ed order) whose name matches `pattern` (re.search), with everything they
  depend on; ConfigError if none matches."""
  try:
    wanted = {cell.name for cell in ordered if re.search(pattern, cell.name)}
  except re.error as e:
    raise ConfigError(f"--only={pattern!r} is not a regular expression ({e})") from None
  if not wanted:
    raise ConfigError(f"--only={pattern!r} matches no cell; the cells are "
                      f"{', '.join(c.name for c in ordered[:6])}{' ...' if len(ordered) > 6 else ''}")
  by_name = {cell.name: cell for cell in ordered}
  todo = list(wanted)
  while todo:
    for dep in by_name[todo.pop()].dependencies():
      if dep not in wanted:
        wanted.add(dep)
        todo.append(dep)
  return [cell for cell in ordered if cell.name in wanted]


def fill(text: str, root: str) -> str:
  """`text` with every `{cell:NAME}` replaced by the absolute path of ROOT/NAME."""
  return PLACEHOLDER.sub(lambda m: os.path.join(root, m[1]), text)


def command_args(cell: Cell, root: str, overrides: Sequence[str] = ()) -> list[str]:
  """The `--config=... --workdir=... --config.k=v` arguments of a train or baseline cell under
  `root`, `overrides` (`key=value`, from the runner's command line) last so that they win."""
  args = [f"--config={fill(cell.config, root)}", f"--workdir={os.path.join(root, cell.name)}"]
  args += [f"--config.{key}={fill(_literal(value), root)}" for key, value in cell.overrides.items()]
  args += [f"--config.{item}" for item in overrides]
  return args


def _literal(value: Any) -> str:
  """A value as `--config.key=` parses it back (tuples as Python literals, strings as they are)."""
  return value if isinstance(value, str) else repr(value)


def split_spec(spec: str) -> tuple[str, str]:
  """`path:sweep=NAME` → (path, NAME); ConfigError naming the fix otherwise."""
  path, _, arg = spec.partition(":")
  match = re.fullmatch(r"sweep=([\w.+-]+)", arg)
  if not match:
    raise ConfigError(f"--config={spec!r} names no sweep; pass --config={path}:sweep=NAME (the "
                      "sweeps are what the config's get_sweep(name) accepts)")
  return path, match[1]


def load(spec: str) -> Sweep:
  """The sweep `path:sweep=NAME` of a config file (its `get_sweep(NAME)`), checked."""
  path, name = split_spec(spec)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; check the --config path")
  module_spec = importlib.util.spec_from_file_location("jtl_sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  get_sweep = getattr(module, "get_sweep", None)
  if not callable(get_sweep):
    raise ConfigError(f"config file {path!r} declares no sweeps; a sweep is `def get_sweep(name)` "
                      "returning a jtl.sweep.Sweep (see docs/sweeps.md)")
  try:
    sweep = get_sweep(name)
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{path}: {e.args[0] if e.args else e}") from None
  if not isinstance(sweep, Sweep):
    raise ConfigError(f"{path}: get_sweep({name!r}) returned {type(sweep).__name__}, not a "
                      "jtl.sweep.Sweep")
  check(sweep)
  return sweep
