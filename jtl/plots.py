"""Plots written to `WORKDIR/plots/` (PNG, matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402


def curves(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, ylabel: str,
           path: str | epath.Path) -> epath.Path:
  """One line per label from `(step, value)` points; returns the written path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for label, points in series.items():
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker="o", markersize=3, label=label)
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  return save(fig, path)


def save(fig: "plt.Figure", path: str | epath.Path) -> epath.Path:
  """Lays out `fig`, writes it as PNG to `path` (local or remote; parents made), closes it."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path
