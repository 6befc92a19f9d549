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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported
from jtl import startup_notices  # noqa: E402

startup_notices.import_tensorflow()  # its start-up notices once, not twice
from collections.abc import Callable  # noqa: E402

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jtl.config import unknown_override_error  # noqa: E402
from jtl.errors import ConfigError, RunError, storage_problem  # noqa: E402

FlagValues = flags.FlagValues
_NONE_OVERRIDE = re.compile(r"--config\.([\w.]+)=None")
Define = Callable[[FlagValues, list[str]], None]
Main = Callable[[FlagValues], None]
# Config sections whose valid keys depend on a choice; their owners validate them.
OPEN_SECTIONS = ("model", "evals", "multitask.arch_options", "multitask.weighting_options")
EXIT_BAD_INPUT, EXIT_RUN_FAILED = 2, 3


def define_config_flag(flag_values: FlagValues, argv: list[str], help_string: str) -> None:
  """`--config=path[:args]` plus its `--config.KEY=VALUE` overrides (checked by `load_config`).

  `--config.KEY=None` is taken out of `argv` (in place: it is the list parsed next) and applied by
  `load_config`, because ml_collections parses an int or str field's "None" as a number or the
  string 'None'.
  """
  none_overrides = [a for a in argv if _NONE_OVERRIDE.fullmatch(a)]
  argv[:] = [a for a in argv if a not in none_overrides]
  config_flags.DEFINE_config_file("config", None, help_string, flag_values=flag_values,
                                  lock_config=False, accept_new_attributes=True, sys_argv=argv)
  flag_values["config"].none_overrides = [_NONE_OVERRIDE.fullmatch(a)[1] for a in none_overrides]


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
  reference = _config_as_written(config_flags.get_config_filename(flag))
  none_overrides = getattr(flag, "none_overrides", [])
  for path in [*config_flags.get_override_values(flag), *none_overrides]:
    if not _has_key(reference, path) and not any(path.startswith(p + ".") for p in OPEN_SECTIONS):
      raise unknown_override_error(path, reference)
  config = flag.value
  for path in none_overrides:
    _set_none(config, reference, path)
  config.lock()  # from here on a typo in code that sets a key fails loudly too
  return config


def _set_none(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
              path: str) -> None:
  """`--config.PATH=None`: allowed where the config file declares the key as possibly None (a
  placeholder or typed field, or the value None) and in the open sections (the component checks)."""
  *parents, leaf = path.split(".")
  written = reference
  for part in parents:
    written = written[part] if isinstance(written, ml_collections.ConfigDict) else None
  declared = written._fields.get(leaf) if isinstance(written, ml_collections.ConfigDict) else None  # pylint: disable=protected-access
  if not (declared is None or isinstance(declared, ml_collections.FieldReference)
          or any(path.startswith(p + ".") for p in OPEN_SECTIONS)):
    raise ConfigError(f"--config.{path}=None: {path} takes a value of type "
                      f"{type(declared).__name__}, not None; give a value or leave the flag out")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = None


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


def _config_file_problem(argv: list[str]) -> str | None:
  """What is wrong with the `--config` file itself (absl's own words for it name a module
  `config_config`, or only "an earlier failure" once an override is given), or None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              next((b for a, b in zip(argv, argv[1:]) if a == "--config"), None))
  if not spec:
    return None
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    return _missing_config(path)
  with open(path) as f:
    if not re.search(r"\bget_config\b", f.read()):  # (only asked once loading it failed)
      return _no_get_config(path)
  return None


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
  except (ConfigError, ValueError, TypeError, KeyError, AttributeError, OSError) as e:
    return _fail(_config_file_problem(argv) or _one_line(e))


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


def _quiet_shutdown() -> None:
  """After a storage error: the write threads that hit it too (orbax, tensorstore callbacks into a
  closed event loop) would print their own tracebacks while the process exits; the error line says
  it all."""
  import threading  # pylint: disable=g-import-not-at-top
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  sys.excepthook = lambda *args: None


def _guarded(main: Main, flag_values: FlagValues) -> int:
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
    _quiet_shutdown()
    return _fail(message)
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


class _OwnInfoOnly(py_logging.Filter):
  """INFO lines from jtl itself; libraries (orbax, tfds, XLA) only from WARNING up, without
  tracebacks. --verbosity=1 shows everything."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if logging.get_verbosity() >= logging.DEBUG:
      return True
    own = any(part in record.pathname for part in ("/jtl/", "/experiments/"))
    if not own and record.exc_info:  # a library thread's traceback (orbax on a full disk: dozens):
      record.exc_info, record.exc_text = None, None  # its one-line message stays; the run's own
    return own or record.levelno >= py_logging.WARNING  # error line says what to do


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
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    sys.exit(_guarded(main, flags.FLAGS))

  app.run(wrapped, flags_parser=parse)
