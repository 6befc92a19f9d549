"""Mutation harness: does the test suite notice when a mechanism the README claims is removed?

Each mutation names one claim, one exact replacement in one file (the mechanism removed, its sign
flipped or an option ignored) and the test files (or test ids) that should notice. For each, the
replacement is applied to a private copy of the repository and only those tests run there
(PYTHONPATH = the copy): a failing run means the mutation is KILLED, a passing one that it SURVIVED,
i.e. no test can tell the mechanism from its absence. A replacement whose old text is not found
exactly once is an error (the code moved on; fix the entry), never a silent pass.

  python -m experiments.mutants                 # all, one line per mutation, a table at the end
  python -m experiments.mutants --list          # names only
  python -m experiments.mutants --only remat    # those whose name matches a regex
  make mutants                                  # all, at low priority

Slow (each mutation compiles its tests afresh): see docs/mutants.md for the timing and the last
table. Exit status 0 when every mutation selected is killed, 1 when one survives, 2 on a bad entry.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from experiments.mutations import MUTATIONS, Mutation  # the catalogue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "workdirs", "__pycache__", ".pytest_cache",
                                     "*.egg-info", "demo_workdir")




class EntryError(Exception):
  """A mutation whose old text is not in its file exactly once."""


def apply(copy_root: str, m: Mutation) -> str:
  """Applies `m` inside `copy_root`; returns the file's original text (to restore it)."""
  path = os.path.join(copy_root, m.path)
  if not os.path.exists(path):
    raise EntryError(f"mutation {m.name!r}: no file {m.path}")
  with open(path) as f:
    text = f.read()
  count = text.count(m.old)
  if count != 1:
    raise EntryError(f"mutation {m.name!r}: its old text occurs {count} times in {m.path} (must be "
                     "exactly once; update the entry in experiments/mutants.py)")
  with open(path, "w") as f:
    f.write(text.replace(m.old, m.new))
  return text


def run_tests(copy_root: str, tests: tuple[str, ...], env: dict[str, str], timeout: float
              ) -> tuple[int, str]:
  """(pytest exit status, last lines of its output) for `tests` run inside the copy."""
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
  try:
    done = subprocess.run(command, cwd=copy_root, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, "timed out"
  lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
  return done.returncode, "\n".join(lines[-3:])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=None, help="regex: run the mutations whose name matches")
  parser.add_argument("--list", action="store_true", help="print the names and claims, run nothing")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutation's tests")
  parser.add_argument("--baseline", action="store_true",
                      help="first run every selected mutation's tests unmutated (they must pass)")
  parser.add_argument("--shard", default=None,
                      help="I/N: every N-th mutation from the I-th (0-based), to split a run in N")
  args = parser.parse_args(argv)
  selected = [m for m in MUTATIONS if args.only is None or re.search(args.only, m.name)]
  if args.shard:
    index, count = (int(x) for x in args.shard.split("/"))
    selected = selected[index::count]
  names = [m.name for m in MUTATIONS]
  if len(set(names)) != len(names):
    print("error: two mutations share a name", file=sys.stderr)
    return 2
  if args.list:
    for m in selected:
      print(f"{m.name:40s} {m.claim}")
    return 0
  if not selected:
    print(f"error: no mutation matches --only={args.only!r} (--list shows them)", file=sys.stderr)
    return 2

  # SIGTERM ends the run through the `finally` blocks below: the copy is removed, the file restored.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  work = tempfile.mkdtemp(prefix="jtl_mutants_")
  copy_root = os.path.join(work, "repo")
  shutil.copytree(ROOT, copy_root, ignore=COPY_IGNORE)
  env = {**os.environ, "PYTHONPATH": copy_root,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL": "3",
         "JAX_PLATFORMS": "cpu",
         # Shared by every run: datasets built once, unmutated programs compiled once.
         "TFDS_DATA_DIR": os.path.join(work, "tfds"),
         "JTL_COMPILATION_CACHE": os.path.join(work, "xla_cache")}
  try:
    for m in selected:  # every entry checked before anything slow runs
      original = apply(copy_root, m)
      with open(os.path.join(copy_root, m.path), "w") as f:
        f.write(original)
  except EntryError as e:
    print(f"error: {e}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 2

  if args.baseline:
    tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
    status, tail = run_tests(copy_root, tests, env, args.timeout * 4)
    if status != 0:
      print(f"error: the tests fail without any mutation:\n{tail}", file=sys.stderr)
      shutil.rmtree(work, ignore_errors=True)
      return 2
    print("baseline: every mapped test passes unmutated", flush=True)

  results = []
  try:
    for m in selected:
      original = apply(copy_root, m)
      start = time.time()
      try:
        status, tail = run_tests(copy_root, m.tests, env, args.timeout)
      finally:
        with open(os.path.join(copy_root, m.path), "w") as f:
          f.write(original)
      # pytest: 0 all passed; 1 some failed; 2-4 interrupted/usage; 5 nothing collected.
      verdict = "SURVIVED" if status == 0 else "KILLED"
      if status == 5 or status == -1:
        verdict = "ERROR"
      results.append((m, verdict, time.time() - start))
      print(f"{verdict:8s} {m.name:40s} {time.time() - start:6.0f} s", flush=True)
      if verdict != "KILLED":
        print("         " + tail.replace("\n", "\n         "), flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  print("\n| mutation | claim | result | s |\n|---|---|---|---|")
  for m, verdict, seconds in results:
    print(f"| `{m.name}` | {m.claim} | {verdict} | {seconds:.0f} |")
  killed = sum(v == "KILLED" for _, v, _ in results)
  print(f"\n{killed}/{len(results)} killed")
  return 0 if killed == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())
