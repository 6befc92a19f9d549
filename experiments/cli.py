"""Shared absl entry-point plumbing: the config flag, one-line errors, optional multi-host start-up.

An entry point (`experiments/train.py`, `evaluate.py`, ...) is two functions:

  define_flags(flag_values, argv)   registers its flags (`define_config_flag` for `--config`)
  main(flag_values)                 runs it; raises ConfigError for bad input

`run(define_flags, main)` is its `__main__`; `execute(define_flags, main, argv)` runs the very same
code in-process on fresh flag values and returns the exit status (what the tests use).

Every bad input — an unknown `--config.key`, a value of the wrong type, a config file that does not
exist, a ConfigError raised while the experiment is set up — ends as one line `error: ...` on stderr
and exit status 2, before anything is compiled or written.

`--config.KEY=VALUE` may name any key the config file defines, and, in the sections whose keys depend
on a choice (`model`: the chosen model's options; `evals`: evaluators and their options; a multitask
run's `arch_options` and `weighting_options`), any key: the component validates those (an unknown
model option lists the valid ones). Anything else that names no key of the config file is an error
with a did-you-mean.
"""
from __future__ import annotations

import importlib.util
import logging as py_logging
import os
import re
import sys

from jtl import startup_notices  # noqa: E402

# The console shows jtl's own lines; --verbosity=1 brings the libraries' back, TF's and XLA's C++
# INFO lines included (read from argv: absl's flags are not parsed yet). Both before TF is imported.
_VERBOSE = startup_notices.verbose(sys.argv)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if _VERBOSE else "3")
startup_notices.import_tensorflow(quiet=not _VERBOSE)  # its start-up notices once, not twice
from collections.abc import Callable  # noqa: E402

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jtl.config import unknown_override_error  # noqa: E402
from jtl.errors import ConfigError, RunError, storage_problem  # noqa: E402

FlagValues = flags.FlagValues
Define = Callable[[FlagValues, list[str]], None]
Main = Callable[[FlagValues], None]
# Config sections whose valid keys depend on a choice; their owners validate them.
OPEN_SECTIONS = ("model", "evals", "multitask.arch_options", "multitask.weighting_options")
EXIT_BAD_INPUT, EXIT_RUN_FAILED = 2, 3


_NONE_OVERRIDE = re.compile(r"--config\.([\w.]+)=None")


class _NoneOverride(flags.Flag):
  """`--config.KEY=None`: sets KEY to None whatever its type. config_flags parses `None` only for
  keys typed `object`: an int key (`init_from.step`) refuses it, a str key (`data.data_dir`) takes
  the string 'None', a tuple key (`data.labels`) becomes `(None,)`, so options documented as
  accepting None would not."""

  def __init__(self, path: str):
    super().__init__(flags.EnumParser(["None"]), flags.ArgumentSerializer(), f"config.{path}",
                     None, f"Sets config.{path} to None.")
    self.path = path


def define_config_flag(flag_values: FlagValues, argv: list[str], help_string: str) -> None:
  """`--config=path[:args]` plus its `--config.KEY=VALUE` overrides (checked by `load_config`);
  `--config.KEY=None` sets any key to None (the owner of the key says if None is valid there)."""
  none_paths = [m[1] for m in map(_NONE_OVERRIDE.fullmatch, argv) if m]
  rest = [a for a in argv if not _NONE_OVERRIDE.fullmatch(a)]
  config_flags.DEFINE_config_file("config", None, help_string, flag_values=flag_values,
                                  lock_config=False, accept_new_attributes=True, sys_argv=rest)
  for path in dict.fromkeys(none_paths):
    flags.DEFINE_flag(_NoneOverride(path), flag_values=flag_values)


def _set_none(config: ml_collections.ConfigDict, path: str,
              reference: ml_collections.ConfigDict) -> None:
  *parents, key = path.split(".")
  node = config
  for part in parents:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise unknown_override_error(path, reference)
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise unknown_override_error(path, reference)
  node[key] = None


def _define_distributed(flag_values: FlagValues) -> None:
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-host runs (jax.distributed.initialize).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.",
                       flag_values=flag_values)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection "
                    "(Cloud TPU pods, SLURM).", flag_values=flag_values)
  flags.DEFINE_integer("heartbeat_timeout", 100, "Multi-host: seconds without a peer's heartbeat "
                       "after which the others stop (exit non-zero) instead of waiting forever.",
                       flag_values=flag_values)


def _has_key(config: ml_collections.ConfigDict, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _config_as_written(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a `path[:arg]` config file, without the command line's overrides."""
  path, *arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("jtl_config_reference", path)
  if module_spec is None or not os.path.isfile(path):
    raise ConfigError(_missing_config(path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(_no_get_config(path))
  return module.get_config(*arg)


def load_config(flag_values: FlagValues) -> ml_collections.ConfigDict | None:
  """The parsed `--config` (None if not given), its overrides checked against the file's own keys."""
  flag = flag_values["config"]
  if flag.value is None:
    return None
  reference = _config_as_written(config_flags.get_config_filename(flag))  # (a missing file: says so)
  config = flag.value
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(_not_a_config(config_flags.get_config_filename(flag).split(":", 1)[0], config))
  none_paths = [flag_values[name].path for name in flag_values
                if isinstance(flag_values[name], _NoneOverride) and flag_values[name].present]
  for path in [*config_flags.get_override_values(flag), *none_paths]:
    if not _has_key(reference, path) and not any(path.startswith(p + ".") for p in OPEN_SECTIONS):
      raise unknown_override_error(path, reference)
  for path in none_paths:
    _set_none(config, path, reference)
  config.lock()  # from here on a typo in code that sets a key fails loudly too
  return config


def _one_line(error: BaseException) -> str:
  """The useful part of an exception as one line (the last line of an embedded traceback)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = str(text)
  if "Traceback (most recent call last)" in text:  # config_flags wraps a config file's exception
    text = [line for line in text.strip().splitlines() if line.strip()][-1]
    text = text.split(": ", 1)[1] if ": " in text else text
  return " ".join(text.split()) or type(error).__name__


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
  print(f"error: {message}", file=sys.stderr, flush=True)
  return status


def _config_file_problem(argv: list[str], error: BaseException) -> str | None:
  """What is wrong with the `--config` file itself, given the `error` loading it raised (absl's own
  words for it name a module `config_config`, or only "an earlier failure" once an override is
  given; Python's are a traceback), or None if the file is fine and the error is about a value."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              next((b for a, b in zip(argv, argv[1:]) if a == "--config"), None))
  if not spec:
    return None
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    return _missing_config(path)
  if isinstance(error, SyntaxError):
    return (f"config file {path!r} has a syntax error at line {error.lineno}: {error.msg}; fix "
            "the file")
  if isinstance(error, ImportError):
    return f"config file {path!r} cannot be imported ({error}); fix its imports"
  with open(path) as f:
    if not re.search(r"\bget_config\b", f.read()):  # (only asked once loading it failed)
      return _no_get_config(path)
  if not isinstance(error, ValueError):  # (ValueError, ConfigError: get_config's own message)
    try:
      config = _config_as_written(spec)
    except Exception as again:  # pylint: disable=broad-except  (any bug in the user's file)
      return (f"config file {path!r}: get_config raised {type(again).__name__}: "
              f"{_one_line(again)}; fix the config file or its :arguments")
    if not isinstance(config, ml_collections.ConfigDict):
      return _not_a_config(path, config)
  return None


def _missing_parent(argv: list[str], error: BaseException) -> str | None:
  """config_flags' KeyError for `--config.A.B.C=...` whose section A.B does not exist: the unknown
  key error with the keys there are (None if that is not what happened)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not isinstance(error, KeyError) or not spec:
    return None
  try:
    reference = _config_as_written(spec)
  except Exception:  # pylint: disable=broad-except  (_config_file_problem speaks for the file)
    return None
  for arg in argv:
    named = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if named and "." in named[1] and not _has_key(reference, named[1].rsplit(".", 1)[0]):
      path = named[1]
      section = next((p for p in OPEN_SECTIONS if path.startswith(p + ".")), None)
      if section is None:
        return str(unknown_override_error(path, reference))
      entry = path[len(section) + 1:].split(".")[0]
      return (f"--config.{path}: config.{section} has no {entry!r} (it has: "
              f"{', '.join(_keys(reference, section)) or 'nothing'}); the command line sets keys of "
              f"what the config file defines: add config.{section}.{entry} there, or fix the name")
  return None


def _keys(config: ml_collections.ConfigDict, path: str) -> list[str]:
  node = config
  for part in path.split("."):
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  return list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []


def _not_a_config(path: str, value: object) -> str:
  return (f"config file {path!r}: get_config() returned a value of type {type(value).__name__}, "
          "not an ml_collections.ConfigDict; return one (see experiments/configs/)")


def _no_get_config(path: str) -> str:
  return (f"config file {path!r} defines no get_config(); a config file is a Python file with "
          "`def get_config(arg=None)` returning an ml_collections.ConfigDict (see experiments/configs/)")


def _missing_config(path: str) -> str:
  where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
  return f"config file {path!r} does not exist{where}; check the --config path"


def _parse(flag_values: FlagValues, argv: list[str]) -> list[str] | int:
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = _one_line(e)
    named = re.match(r"flag --([\w.]+)=", message)
    if named and "must have a value other than None" in message:
      return _fail(f"--{named[1]} is required; pass --{named[1]}=...")
    if named and named[1] in flag_values:
      return _fail(f"{message}; --{named[1]} takes a value of type "
                   f"{flag_values[named[1]].flag_type()}")
    return _fail(message)
  except Exception as e:  # pylint: disable=broad-except  (a config file is user code: anything)
    return _fail(_config_file_problem(argv, e) or _missing_parent(argv, e) or _one_line(e))


def _start_distributed(flag_values: FlagValues) -> None:
  if flag_values.coordinator_address or flag_values.distributed:
    import jax
    # Only used by the CPU backend (multi-process tests on one machine); must precede initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                               num_processes=flag_values.num_processes,
                               process_id=flag_values.process_id,
                               heartbeat_timeout_seconds=flag_values.heartbeat_timeout)
    logging.info("distributed: process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _quiet_shutdown(hard: bool) -> None:
  """After a storage error: the write threads that hit it too would print their own tracebacks while
  the process exits, or keep it waiting for them; the error line says it all. `hard` (a process of
  its own, not a test calling `execute`): end now with `os._exit`, once the error line is flushed."""
  import threading  # pylint: disable=g-import-not-at-top
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  sys.excepthook = lambda *args: None
  if hard:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_BAD_INPUT)  # pylint: disable=protected-access


def _closed_loop_callbacks_unprinted() -> None:
  """tensorstore calls back into orbax's asyncio loop with `call_soon_threadsafe`; once a failed save
  (full disk, `ulimit -f`) has ended that loop, each late callback reports `RuntimeError: Event loop
  is closed` as an unraisable exception (a bare traceback, from C), before jtl's one `error:` line.
  Those, and only those, are dropped."""
  shown = sys.unraisablehook

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    shown(unraisable)

  sys.unraisablehook = hook


def _guarded(main: Main, flag_values: FlagValues, hard_exit: bool = False) -> int:
  try:
    _start_distributed(flag_values)
    main(flag_values)
  except ConfigError as e:
    logging.flush()
    return _fail(_one_line(e))
  except RunError as e:
    logging.flush()
    return _fail(_one_line(e), EXIT_RUN_FAILED)
  except Exception as e:  # full disk, quota, ulimit -f, lost permissions: whoever raised it (orbax...)
    message = storage_problem(e)
    if message is None:
      raise
    logging.flush()
    status = _fail(message)
    _quiet_shutdown(hard_exit)
    return status
  return 0


def execute(define_flags: Define, main: Main, argv: list[str]) -> int:
  """Parses `argv` into fresh flag values and runs `main`; returns the exit status."""
  flag_values = FlagValues()
  define_flags(flag_values, argv)
  _define_distributed(flag_values)
  parsed = _parse(flag_values, argv)
  if isinstance(parsed, int):
    return parsed
  return _guarded(main, flag_values)


# Library warnings that are no news: TFDS on a dataset folder it is about to prepare.
_HARMLESS = ("Variant folder %s has no %s",)


class _OwnInfoOnly(py_logging.Filter):
  """INFO lines from jtl itself; libraries (orbax, tfds, XLA) only from WARNING up (but for the
  `_HARMLESS` ones), without tracebacks. --verbosity=1 shows everything."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if logging.get_verbosity() >= logging.DEBUG:
      return True
    own = any(part in record.pathname for part in ("/jtl/", "/experiments/"))
    if not own and record.msg in _HARMLESS:
      return False
    if not own and record.exc_info:  # a library thread's traceback (orbax on a full disk: dozens):
      record.exc_info, record.exc_text = None, None  # its one-line message stays; the run's own
    return own or record.levelno >= py_logging.WARNING  # error line says what to do


def own_lines_only() -> None:
  """From now on the console shows jtl's own INFO lines and the libraries' warnings (absl's
  `--verbosity=1`: everything). Call it once absl's logging is set up (inside `app.run`)."""
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def run(define_flags: Define, main: Main) -> None:
  """The `__main__` of an entry point: absl's app (logging set-up) around `main`."""
  define_flags(flags.FLAGS, sys.argv)
  _define_distributed(flags.FLAGS)

  def parse(argv: list[str]) -> list[str]:
    parsed = _parse(flags.FLAGS, argv)
    if isinstance(parsed, int):
      sys.exit(parsed)
    return parsed

  def wrapped(argv: list[str]) -> None:
    del argv
    own_lines_only()
    _closed_loop_callbacks_unprinted()
    sys.exit(_guarded(main, flags.FLAGS, hard_exit=True))

  app.run(wrapped, flags_parser=parse)
