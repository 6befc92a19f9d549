"""Benchmark: an entry point's TensorFlow import with and without Keras (jtl/startup_notices.py).

  python -m experiments.bench.startup [--rounds=5]

Each round starts two fresh interpreters, interleaved: one runs `import tensorflow` (which imports
all of Keras 3 too), the other `startup_notices.import_tensorflow()`, what every entry point runs
first (Keras left out). Wall seconds per process, medians over the rounds. The last line is one JSON
object: `with_keras_s`, `without_keras_s` and `ratio` (without / with).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_integer("rounds", 5, "Interleaved rounds (one process of each kind per round).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = {
    "with_keras_s": "import tensorflow",
    "without_keras_s": "from jtl import startup_notices; startup_notices.import_tensorflow()",
}


def seconds(script: str) -> float:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
  env.pop("TF_USE_LEGACY_KERAS", None)
  start = time.perf_counter()
  subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main(argv):
  del argv
  times = {name: [] for name in SCRIPTS}
  for _ in range(FLAGS.rounds):
    for name, script in SCRIPTS.items():
      times[name].append(seconds(script))
  result = {name: round(statistics.median(t), 3) for name, t in times.items()}
  result["ratio"] = round(result["without_keras_s"] / result["with_keras_s"], 3)
  for name, t in times.items():
    print(f"{name}: median {statistics.median(t):.2f} s over {len(t)} processes "
          f"(min {min(t):.2f}, max {max(t):.2f})")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
