"""The table of a sweep: each variant's metrics at the final step, over its seeds.

  python -m experiments.report --workdir=runs/transfer_table [--metric=test/accuracy,test/loss]

Reads what `experiments.sweep` left in ROOT: `sweep.json` (the cells in table order, the sweep's
default metrics) and, per finished cell, its `config.json` (`total_steps`: the final step) and
`eval_metrics.jsonl`. Cells of one variant and column (they differ by seed) are one table cell:
mean ± standard deviation (numpy's, ddof=0) and min–max over the seeds. Writes

  ROOT/report.md   the Markdown table (also printed): a row per variant, a column per column label
                   (e.g. "1 shot") and metric, the number of seeds last;
  ROOT/report.csv  one line per variant × column × metric: n, mean, std, min, max, seeds;
  ROOT/report.png  the first metric against the step, the mean over seeds, a line per variant (one
                   panel per column label).

Unfinished cells are left out and counted under the table; rerun the sweep to finish them.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
from absl import flags

from experiments import tool
from jtl.errors import ConfigError
from jtl.metric_writer import read_jsonl

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "The sweep's root (what experiments.sweep ran in).",
                      flag_values=flag_values)
  flags.DEFINE_list("metric", None, "Metrics to tabulate (default: the sweep's own, from its "
                    "config's get_sweep).", flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


@dataclasses.dataclass
class Group:
  """The finished cells of one (section, variant, column): the seeds of one table cell."""
  section: str
  variant: str
  column: str
  final: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # final rows, one per cell
  curves: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)  # all rows per cell
  seeds: list[Any] = dataclasses.field(default_factory=list)


def final_step(folder: str, cell: dict[str, Any], rows: list[dict[str, Any]]) -> int | None:
  """The step a cell is scored at: its config's total_steps when it trained, else its last row."""
  config_path = os.path.join(folder, "config.json")
  if cell["kind"] == "train" and os.path.exists(config_path):
    with open(config_path) as f:
      return json.load(f)["total_steps"]
  return max((row["step"] for row in rows), default=None)


def collect(root: str) -> tuple[dict[str, Any], list[Group], list[str]]:
  """(sweep.json, the groups in table order, names of reported cells not finished yet)."""
  index_path = os.path.join(root, "sweep.json")
  if not os.path.exists(index_path):
    raise ConfigError(f"{index_path} does not exist; run `python -m experiments.sweep "
                      f"--config=... --workdir={root}` first")
  with open(index_path) as f:
    index = json.load(f)
  groups: dict[tuple[str, str, str], Group] = {}
  unfinished = []
  for cell in index["cells"]:
    if not cell["report"]:
      continue
    folder = os.path.join(root, cell["name"])
    key = (cell["section"], cell["variant"] or cell["name"], cell["column"])
    group = groups.setdefault(key, Group(*key))
    if not os.path.exists(os.path.join(folder, "done.json")):
      unfinished.append(cell["name"])
      continue
    rows = sorted(read_jsonl(os.path.join(folder, "eval_metrics.jsonl")), key=lambda r: r["step"])
    step = final_step(folder, cell, rows)
    final = [row for row in rows if row["step"] == step]
    if not final:
      unfinished.append(cell["name"])
      continue
    group.final.append(final[-1])
    group.curves.append(rows)
    group.seeds.append(cell["seed"])
  return index, list(groups.values()), unfinished


def stats(values: list[float]) -> dict[str, float]:
  """n, mean, std (ddof=0), min and max of the seeds' values."""
  v = np.asarray(values, np.float64)
  return {"n": len(v), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max())}


def values(group: Group, metric: str) -> list[float]:
  return [row[metric] for row in group.final if isinstance(row.get(metric), (int, float))]


def seed_count(group: Group) -> int:
  """Distinct seeds among a group's finished cells (cells without a seed count one each)."""
  named = {seed for seed in group.seeds if seed is not None}
  return len(named) + sum(seed is None for seed in group.seeds)


def text(group: Group, metric: str) -> str:
  """`mean ± std (min–max)` of a table cell; one seed: its value; none: `-`."""
  found = values(group, metric)
  if not found:
    return "-"
  s = stats(found)
  if s["n"] == 1:
    return f"{s['mean']:.3f}"
  return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def markdown(index: dict[str, Any], groups: list[Group], metrics: list[str],
             unfinished: list[str]) -> str:
  columns = list(dict.fromkeys(g.column for g in groups if g.final)) or [""]
  heads = [(m, c) for m in metrics for c in columns]
  names = [c if len(metrics) == 1 else f"{m} {c}".strip() for m, c in heads]
  first = metrics[0] if len(metrics) == 1 and columns != [""] else "variant"
  lines = []
  if index.get("title"):
    lines += [index["title"], ""]
  lines += [f"| {first} | " + " | ".join(names) + " | seeds |",
            "|---|" + "---|" * len(names) + "---|"]
  # Variants with no finished cell yet have no row (the note under the table counts them).
  variants = list(dict.fromkeys((g.section, g.variant) for g in groups if g.final))
  by_key = {(g.section, g.variant, g.column): g for g in groups}
  section = ""
  for sec, variant in variants:
    if sec and sec != section:
      lines.append(f"| *{sec}* |" + " |" * (len(names) + 1))
    section = sec
    cells = [text(by_key[(sec, variant, c)], m) if (sec, variant, c) in by_key else "-"
             for m, c in heads]
    counts = sorted({seed_count(g) for c in columns
                     if (g := by_key.get((sec, variant, c))) and g.final})
    seeds = "-" if not counts else (str(counts[0]) if len(counts) == 1 else
                                    f"{counts[0]}–{counts[-1]}")
    lines.append(f"| {variant} | " + " | ".join(cells) + f" | {seeds} |")
  lines += ["", f"Final step of each run; mean ± std (min–max) over seeds; sweep "
            f"`{index['sweep']}` of `{index['config']}`"
            + (f" with {' '.join('--config.' + o for o in index['overrides'])}"
               if index.get("overrides") else "") + "."]
  if unfinished:
    lines.append(f"{len(unfinished)} cell(s) not finished, left out: {', '.join(unfinished[:5])}"
                 + (" ..." if len(unfinished) > 5 else "") + " (rerun the sweep to finish them).")
  return "\n".join(lines) + "\n"


def csv_text(groups: list[Group], metrics: list[str]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["section", "variant", "column", "metric", "n", "mean", "std", "min", "max",
                   "seeds"])
  for group in groups:
    for metric in metrics:
      found = values(group, metric)
      if found:
        s = stats(found)
        writer.writerow([group.section, group.variant, group.column, metric, s["n"],
                         repr(s["mean"]), repr(s["std"]), repr(s["min"]), repr(s["max"]),
                         " ".join(str(seed) for seed in group.seeds if seed is not None)])
  return out.getvalue()


def mean_curve(group: Group, metric: str) -> list[tuple[int, float]]:
  """(step, mean over the seeds that evaluated that step) of `metric`."""
  by_step: dict[int, list[float]] = {}
  for rows in group.curves:
    for row in rows:
      if isinstance(row.get(metric), (int, float)):
        by_step.setdefault(row["step"], []).append(row[metric])
  return [(step, float(np.mean(v))) for step, v in sorted(by_step.items())]


def plot(groups: list[Group], metric: str, path: str) -> str:
  """`metric` against the step, one line per variant, one panel per column label."""
  from jtl import plots  # pylint: disable=g-import-not-at-top (matplotlib: only when plotting)
  columns = list(dict.fromkeys(g.column for g in groups))
  fig, axes = plots.plt.subplots(1, len(columns), figsize=(5 * len(columns) + 2, 4.5), dpi=110,
                                 squeeze=False, sharey=True)
  for ax, column in zip(axes[0], columns):
    curves = {g.variant: mean_curve(g, metric) for g in groups if g.column == column}
    last = max((step for points in curves.values() for step, _ in points), default=0)
    if len(curves) > 10:  # past the default cycle's 10 colours: 20 distinct ones
      ax.set_prop_cycle(color=plots.plt.cm.tab20.colors)
    for variant, points in curves.items():
      if len(points) == 1:  # one evaluated step (a baseline, a view): a level line across
        points = [(0, points[0][1]), (max(last, 1), points[0][1])]
        ax.plot(*zip(*points), linestyle="--", linewidth=1, label=variant)
      elif points:
        ax.plot(*zip(*points), marker="o", markersize=2, label=variant)
    ax.set(title=column or metric, xlabel="step", ylabel=metric)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=6, loc="best")
  return str(plots.save(fig, path))


def main(argv: list[str]) -> int:
  del argv
  root = os.path.abspath(os.path.expanduser(FLAGS.workdir))
  try:
    index, groups, unfinished = collect(root)
    metrics = FLAGS.metric or index["metrics"]
    seen = {k for g in groups for row in g.final for k in row}
    missing = [m for m in metrics if m not in seen]
    if groups and seen and missing:
      raise ConfigError(f"--metric: {', '.join(missing)} is in no finished cell's "
                        f"eval_metrics.jsonl; available: {', '.join(sorted(seen - {'step'}))}")
  except ConfigError as e:
    return tool.bad_input(e)
  table = markdown(index, groups, metrics, unfinished)
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write(table)
  with open(os.path.join(root, "report.csv"), "w") as f:
    f.write(csv_text(groups, metrics))
  finished = [g for g in groups if g.final]
  picture = (plot(finished, metrics[0], os.path.join(root, "report.png")) if finished
             else "no report.png (no cell has finished)")
  print(table + f"\nwritten: {os.path.join(root, 'report.md')}, report.csv, {picture}", flush=True)
  return 0


if __name__ == "__main__":
  tool.run(define_flags, main)
