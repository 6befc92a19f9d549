"""Exceptions users see: bad input (ConfigError, exit 2) and runs that cannot go on (RunError, exit 3).

Raised before anything is compiled or written; `experiments/*.py` turn it into a one-line message and a
non-zero exit. The message must say what is wrong *and* how to fix it.
"""
import errno
import re


class ConfigError(ValueError):
  """A user-facing configuration or input error with a one-line, actionable message."""


class RunError(RuntimeError):
  """A run that started well but cannot go on (one line: what happened, what is kept, what to do).

  The CLI prints it as `error: ...` and exits with status 3 (2 is for bad input)."""


class NonFiniteError(RunError):
  """The loss or a metric became NaN/Inf; the last good checkpoint is kept."""


# errno → what the storage problem is and what frees it. A run that hits one of these stops with one
# line (`storage_problem`), exit 2: nothing a rerun alone would fix, and the data already on disk is as
# safe as after a kill (checkpoints are committed atomically, metrics rows appended whole).
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota or raise it"),
    errno.EFBIG: ("a file grew past the file-size limit (ulimit -f)",
                  "raise the limit (ulimit -f unlimited)"),
    errno.EROFS: ("the file system is read-only", "make it writable"),
    errno.EACCES: ("permission was denied", "give this user write access to it"),
    errno.EPERM: ("the operation is not permitted", "give this user write access to it"),
}
# The same problems as text, for libraries that report them in their own exception types (orbax and
# tensorstore raise e.g. ValueError('RESOURCE_EXHAUSTED: ... No space left on device')).
_STORAGE_TEXT = (("No space left on device", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
                 ("File too large", errno.EFBIG), ("Read-only file system", errno.EROFS),
                 ("Permission denied", errno.EACCES), ("Operation not permitted", errno.EPERM))
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")  # the last one is the file (tensorstore's style)
_BARE_PATH = re.compile(r"(?<![\w.])(/[^\s\"':;,]+/[^\s\"':;,]+)")  # /a/b, not a key like w/0.0.0


def _chain(error: BaseException) -> list[BaseException]:
  out, todo = [], [error]
  while todo and len(out) < 20:
    e = todo.pop()
    if e is None or any(e is seen for seen in out):
      continue
    out.append(e)
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return out


def storage_problem(error: BaseException) -> str | None:
  """One line for an exception caused by full, read-only or otherwise unwritable storage (anywhere
  in its cause chain: OSError errno or a library's message): what happened, where, and what to
  free; None for anything else."""
  for e in _chain(error):
    code, path = None, None
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      code, path = e.errno, e.filename
    else:
      text = str(e)
      code = next((c for phrase, c in _STORAGE_TEXT if phrase in text), None)
      if code is not None:
        paths = _QUOTED_PATH.findall(text) or _BARE_PATH.findall(text)
        path = paths[-1] if paths else None
    if code is not None:
      what, fix = _STORAGE_ERRNOS[code]
      where = f" writing {path}" if path else ""
      return (f"{what}{where} ({type(e).__name__}); {fix}, then rerun the same command: it resumes "
              "from the last complete checkpoint")
  return None
