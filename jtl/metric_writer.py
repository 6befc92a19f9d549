"""Metrics to `WORKDIR/<name>.jsonl` (one JSON object per step, with "step") and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing, so callers never branch on it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath


class MetricWriter:
  """Appends `{"step": s, **scalars}` lines to a JSONL file and the same scalars to TensorBoard."""

  def __init__(self, workdir: str | epath.Path, name: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / f"{name}.jsonl"
    self._tb = None
    if self.enabled and tensorboard:
      import tensorflow as tf  # tf.data is already loaded; its summary writer gives TB events
      self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / "tensorboard" / name))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for key, value in row.items():
          if key != "step" and isinstance(value, (int, float)):
            tf.summary.scalar(key, value)
      self._tb.flush()

  def drop_after(self, step: int) -> None:
    """Removes rows past `step`: a resumed run logs those steps again (a killed run had logged them
    after its last checkpoint), so every step appears once."""
    if not self.enabled or not self.path.exists():
      return
    rows = read_jsonl(self.path)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) < len(rows):
      self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(value).item()
  return value


def read_jsonl(path: str | epath.Path) -> list[dict[str, Any]]:
  """All rows of a metrics file (empty if it does not exist yet)."""
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
