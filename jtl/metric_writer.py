"""Metrics to `WORKDIR/<name>.jsonl` (one JSON object per step, with "step") and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing, so callers never branch on it.

A process killed in the middle of an append (or a full disk) can leave a partial last line. Each row is
appended with one `write` of the whole line, which makes that unlikely, and the damage is repaired where
it would matter: a writer drops a partial last line when it opens the file (so the next row does not
glue onto it), and `read_jsonl` skips one, each time with a warning.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
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
    if self.enabled:
      drop_partial_last_line(self.path)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    line = (json.dumps(row) + "\n").encode()
    if _is_local(self.path):  # one write(2) on an O_APPEND file: a kill cannot split it in two
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        os.write(fd, line)
      finally:
        os.close(fd)
    else:
      with self.path.open("ab") as f:
        f.write(line)
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


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _partial_tail(text: str) -> str:
  """The part of `text` after its last newline that is not a complete JSON object ('' if none)."""
  tail = text[text.rfind("\n") + 1:]
  if not tail.strip():
    return ""
  try:
    json.loads(tail)
    return ""  # a whole row whose newline is missing: keep it
  except ValueError:
    return tail


def drop_partial_last_line(path: str | epath.Path) -> None:
  """Cuts a partial last line (a write that was cut short) off a metrics file, with a warning; adds
  the newline a whole last row may lack."""
  path = epath.Path(path)
  if not path.exists():
    return
  text = path.read_text()
  if not text or text.endswith("\n"):
    return
  tail = _partial_tail(text)
  if tail:
    logging.warning("%s ends with a partial line (%d characters, a write cut short): dropped",
                    path, len(tail))
    path.write_text(text[:len(text) - len(tail)])
  else:
    path.write_text(text + "\n")


def read_jsonl(path: str | epath.Path) -> list[dict[str, Any]]:
  """All rows of a metrics file (empty if it does not exist yet); a partial last line (a write cut
  short) is skipped with a warning."""
  path = epath.Path(path)
  if not path.exists():
    return []
  text = path.read_text()
  tail = "" if text.endswith("\n") else _partial_tail(text)
  if tail:
    logging.warning("%s ends with a partial line (%d characters, a write cut short): skipped",
                    path, len(tail))
    text = text[:len(text) - len(tail)]
  return [json.loads(line) for line in text.splitlines() if line.strip()]
