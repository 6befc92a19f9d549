"""One Python process that runs a document's `python -m experiments.train|evaluate ...` commands, one
after the other, as `python -m` runs them (tests/test_docs.py).

Each new process would spend most of a two-step run importing TensorFlow, JAX and jtl again; this one
imports them once. A command runs through `runpy.run_module(module, run_name="__main__")`, the very
code `python -m` runs (`__main__` block, absl's app, exit status), with `sys.argv` set, its stdout and
stderr (file descriptors 1 and 2: Python's, absl's and C++'s lines alike) written to a log file of its
own, and the flags it defined removed afterwards, so that the next one defines them afresh.

Protocol, one JSON object a line: stdin gets {"argv": [...], "log": PATH}; the answer on stdout (the
original descriptor 1, kept aside) is {"status": N}. The process ends at the end of stdin.
"""
import importlib
import json
import os
import runpy
import sys
import traceback


def main() -> None:
  answers = os.fdopen(os.dup(1), "w")
  sys.path[0] = os.getcwd()  # as `python -m` from the current directory
  from absl import flags  # pylint: disable=g-import-not-at-top
  importlib.import_module("experiments.cli")  # TensorFlow, absl, jtl's console set-up: once
  for line in sys.stdin:
    request = json.loads(line)
    answers.write(json.dumps({"status": run(request["argv"], request["log"], flags.FLAGS)}) + "\n")
    answers.flush()


def run(argv: list[str], log: str, flag_values) -> int:
  """`python -m argv[0] argv[1:]` in this process; its exit status. Output goes to `log`."""
  known = set(flag_values)
  saved = os.dup(1), os.dup(2)
  sys.stdout.flush()
  sys.stderr.flush()
  with open(log, "w") as out:
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
  sys.argv = list(argv)
  try:
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    status = 0
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-except  (reported in the log, as Python would)
    traceback.print_exc()
    status = 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
      os.close(fd)
    for name in set(flag_values) - known:
      delattr(flag_values, name)
  return status


if __name__ == "__main__":
  main()
