"""TensorFlow's start-up notices once per run, not twice.

`import tensorflow` loads two shared libraries that each carry their own copy of absl's C++ logging
and of TF's `port.cc`, so each prints "WARNING: All log messages before absl::InitializeLog() is
called are written to STDERR" and the "oneDNN custom operations are on" notice: twice per process.
`TF_CPP_MIN_LOG_LEVEL` cannot silence them, because absl writes them before TF's own logging is set
up. `import_tensorflow()` imports TF with file descriptor 2 captured and writes what it printed back,
each line once (lines compared without absl's time stamp and thread id), and at the default verbosity
without its INFO notices at all (`quiet`: the console shows jtl's own lines; `--verbosity=1` keeps
them). Entry points call it before anything else imports TF; later calls, and processes where TF is
already imported, do nothing.

Keras is not imported with it. `import tensorflow` imports all of Keras 3 eagerly ("so that any
function that needs to happen at load time will trigger", inside a `try: ... except ImportError`),
a third of TF's import time, though jtl uses only tf.data, tf.io and the summary writer: every
entry point, documented command and sweep cell pays it. While TF imports, `keras` is marked
unimportable (`sys.modules["keras"] = None`, which TF's guard catches); right after, the mark is
removed, so `import keras` and `tf.keras` load Keras as usual when someone asks for it. What differs:
TF's `__path__` lacks Keras' folders, so the module-path form `import tensorflow.keras` fails (use
`tf.keras` or `import keras`). `TF_USE_LEGACY_KERAS=1` keeps TF's own behaviour. The saving is
measured by `python -m experiments.bench.startup`.
"""
from __future__ import annotations

import os
import re
import sys
import threading

_PREFIX = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ ")  # absl's "I0000 00:00:1796.5  10871 "
# What TF prints at INFO level while it loads: absl's note that it is not set up yet (a WARNING in
# name only), "oneDNN custom operations are on", and the CPU feature notice (with its second line).
_NOTICE = re.compile(rb"^(I\d{4} [\d:.]+\s+\d+ |WARNING: All log messages before absl::InitializeLog"
                     rb"|To enable the following instructions: )")


def dedupe(output: bytes) -> bytes:
  """`output` with every line after its first occurrence dropped (absl's time stamp ignored)."""
  seen, kept = set(), []
  for line in output.splitlines(keepends=True):
    key = _PREFIX.sub(b"", line).strip()
    if key and key in seen:
      continue
    seen.add(key)
    kept.append(line)
  return b"".join(kept)


def without_notices(output: bytes) -> bytes:
  """`output` without TF's INFO start-up notices (its warnings and errors stay)."""
  return b"".join(line for line in output.splitlines(keepends=True) if not _NOTICE.match(line))


def verbose(argv: list[str]) -> bool:
  """Whether `argv` asks absl for `--verbosity` (or `-v`) 1 or more, before flags are parsed."""
  for i, arg in enumerate(argv):
    name, has_value, value = arg.partition("=")
    if name in ("--verbosity", "-v", "--v"):
      value = value if has_value else (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def import_tensorflow(quiet: bool = False) -> None:
  """Imports tensorflow, each line it prints on stderr written once; with `quiet`, without its INFO
  notices (see the module docstring)."""
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  chunks: list[bytes] = []
  read_end, write_end = os.pipe()
  saved = os.dup(2)

  def drain() -> None:  # a full pipe would block the import
    while chunk := os.read(read_end, 65536):
      chunks.append(chunk)
  reader = threading.Thread(target=drain, daemon=True)
  reader.start()
  os.dup2(write_end, 2)
  os.close(write_end)
  skip_keras = "keras" not in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS", "") not in (
      "1", "true", "True")
  if skip_keras:
    sys.modules["keras"] = None  # type: ignore[assignment]  (TF's eager Keras import fails quietly)
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  finally:
    if skip_keras:
      del sys.modules["keras"]
    sys.stderr.flush()
    os.dup2(saved, 2)  # the pipe's last write end closes: the reader sees the end
    os.close(saved)
    reader.join()
    os.close(read_end)
    output = dedupe(b"".join(chunks))
    os.write(2, without_notices(output) if quiet else output)
