"""Remote (`gs://`) paths at the boundary: is the bucket there and reachable, before anything compiles.

Without this check a missing bucket or an unreachable storage endpoint shows up minutes into a run:
TensorFlow's GCS client (behind `etils.epath`) retries connection failures with exponential backoff,
and a write into a missing bucket is retried the same way. One bucket lookup per bucket and process,
bounded by `JTL_REMOTE_CHECK_TIMEOUT_S` seconds (default 60), turns both into one `error:` line.
"""
from __future__ import annotations

import functools
import os
import re
import threading

from etils import epath

from jtl.errors import ConfigError

_GCS = re.compile(r"^gs://([^/]+)")
TIMEOUT_ENV = "JTL_REMOTE_CHECK_TIMEOUT_S"


def check_reachable(path: str) -> None:
  """ConfigError unless the bucket of a `gs://` path exists and answers; other paths pass as is."""
  match = _GCS.match(path)
  if match:
    _check_bucket(match.group(1), float(os.environ.get(TIMEOUT_ENV, "60")))


@functools.lru_cache(maxsize=None)
def _check_bucket(bucket: str, timeout_s: float) -> None:
  """Looks `gs://bucket` up in a daemon thread (a hung lookup cannot be interrupted, only left)."""
  outcome: dict[str, object] = {}

  def look_up():
    try:
      outcome["exists"] = epath.Path(f"gs://{bucket}").exists()
    except Exception as e:  # permission denied, bad credentials, ...: the message says which
      outcome["error"] = e

  thread = threading.Thread(target=look_up, daemon=True, name=f"jtl-check-gs-{bucket}")
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise ConfigError(
        f"gs://{bucket} did not answer within {timeout_s:g} s; check the network and credentials "
        f"(`gcloud auth application-default login`), or, against an emulator, its environment "
        f"variables (docs/cloud.md); {TIMEOUT_ENV} sets this wait")
  if "error" in outcome:
    first_line = (str(outcome["error"]).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"cannot use gs://{bucket} ({type(outcome['error']).__name__}: {first_line}); "
                      "check that this account may read and write it")
  if not outcome["exists"]:
    raise ConfigError(f"bucket gs://{bucket} does not exist (or this account cannot see it); create "
                      f"it (`gcloud storage buckets create gs://{bucket}`) or fix the path")
