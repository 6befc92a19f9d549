"""Remote (`gs://`) paths at the boundary: is the bucket there and reachable, before anything compiles.

Without this check a missing bucket or an unreachable storage endpoint shows up minutes into a run:
TensorFlow's GCS client (behind `etils.epath`) retries connection failures with exponential backoff,
and a write into a missing bucket is retried the same way. One bucket lookup per bucket and process,
bounded by `JTL_REMOTE_CHECK_TIMEOUT_S` seconds (default 60), turns both into one `error:` line, and
so does a bucket the credentials may not use (HTTP 403), with the fix named.
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


def file_sizes(folder: str | epath.Path) -> dict[str, int]:
  """{path relative to `folder`: size in bytes} of every file under it, at any depth ({} if none).

  On `gs://` this is one paginated object listing (google-cloud-storage, which orbax uses on `gs://`
  too, with the same credentials) instead of a request per folder, per entry (file or folder?) and
  per file size through `etils.epath`: a checkpoint holds dozens of files, and the keep policy looks
  at every kept checkpoint at each save. Elsewhere: a walk with `etils.epath`."""
  match = _GCS.match(str(folder))
  if match:
    path = str(folder)[len(match.group(0)):].strip("/")
    prefix = f"{path}/" if path else ""
    return {blob.name[len(prefix):]: int(blob.size or 0)
            for blob in _storage_client().list_blobs(match.group(1), prefix=prefix)
            if not blob.name.endswith("/")}  # (a folder's placeholder object, if any: not a file)
  root = epath.Path(folder)
  out, todo = {}, [root] if root.exists() else []
  while todo:
    for entry in todo.pop().iterdir():
      if entry.is_dir():
        todo.append(entry)
      else:
        out[str(entry.relative_to(root))] = entry.stat().length
  return out


@functools.lru_cache(maxsize=None)
def _storage_client():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top  (only for gs://)
  return storage.Client()


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
  if "error" in outcome and _denied(outcome["error"]):
    raise ConfigError(
        f"permission denied on gs://{bucket} (HTTP 403): the credentials in use may not use this "
        f"bucket; give that account access (it needs storage.buckets.get and to read, write and "
        f"delete objects: e.g. `gcloud storage buckets add-iam-policy-binding gs://{bucket} "
        f"--member=MEMBER --role=roles/storage.admin`), or run with credentials that have it "
        f"(`gcloud auth application-default login`, or the VM's service account)")
  if "error" in outcome:
    first_line = (str(outcome["error"]).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"cannot use gs://{bucket} ({type(outcome['error']).__name__}: {first_line}); "
                      "check that this account may read and write it")
  if not outcome["exists"]:
    raise ConfigError(f"bucket gs://{bucket} does not exist (or this account cannot see it); create "
                      f"it (`gcloud storage buckets create gs://{bucket}`) or fix the path")


def _denied(error: BaseException) -> bool:
  """Whether a bucket lookup failed because the credentials may not use the bucket (HTTP 403), as
  TensorFlow's GCS file system (PermissionDeniedError), gcsfs (PermissionError) or
  google-cloud-storage (Forbidden) reports it."""
  return isinstance(error, PermissionError) or type(error).__name__ in (
      "PermissionDeniedError", "Forbidden")
