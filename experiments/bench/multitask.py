"""Benchmark: step time of every multitask weighting and gradient aggregation relative to equal weighting.

  python -m experiments.bench.multitask [--tasks=2,4,8] [--batch_size=64] [--rounds=5] [--steps=10]

The real jtl train step (`jtl.train.make_train_step`) of `multitask_digits.py` (hard sharing, a
cnn_small trunk on 12x12 multi-digits), with T tasks (heads alternately predicting the left and right
digit), for each method, in representation space (one backward pass through the trunk: what makes
aggregation cheap) and, for the aggregators at T = 4, in shared-params space (T backward passes: what
PyTorch libraries such as LibMTL do). Rounds are interleaved and medians kept, so machine load
cancels out of the ratios. The last line is one JSON object: `<method>_vs_ew_T<T>` (step time over
equal weighting's at the same T, representation space) and `<method>_params_vs_ew_T4`.
"""
from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments.configs import multitask_digits
from jtl import data, train
from jtl.multitask import aggregators, weighting
from jtl.sharding import to_global

flags.DEFINE_list("tasks", ["2", "4", "8"], "Numbers of tasks.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Steps per timed trial.")
flags.DEFINE_integer("rounds", 5, "Interleaved trials per variant (the median is kept).")
FLAGS = flags.FLAGS
METHODS = list(weighting.WEIGHTINGS) + list(aggregators.AGGREGATORS)


def make_config(num_tasks: int, method: str, grad_space: str) -> ml_collections.ConfigDict:
  c = multitask_digits.get_config(f"weighting={method},grad_space={grad_space}")
  c.tasks = ml_collections.ConfigDict({
      f"t{i}": dict(kind="multiclass", num_outputs=10, feature=("left", "right")[i % 2])
      for i in range(num_tasks)})
  c.batch_size = FLAGS.batch_size
  c.total_steps = 10_000
  c.mesh.axes = (("data", 1),)
  return c


class Variant:
  """One compiled step and its state, timed over `steps` steps per trial."""

  def __init__(self, config: ml_collections.ConfigDict):
    batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    first = next(batches)
    self.setup = train.setup(config, first)
    self.state = train.initial_state(self.setup, *train.fresh_variables(self.setup))
    self.step = train.make_train_step(self.setup)
    self.batch = to_global(first, self.setup.batch_sharding)
    self.state, metrics = self.step(self.state, self.batch)  # compile
    jax.block_until_ready(metrics)

  def trial(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  counts = [int(t) for t in FLAGS.tasks]
  variants = {}
  for t in counts:
    for method in METHODS:
      variants[(method, "representation", t)] = Variant(make_config(t, method, "representation"))
    if 4 in counts and t == 4:
      for method in ["equal", *aggregators.AGGREGATORS]:
        variants[(method, "shared_params", 4)] = Variant(make_config(4, method, "shared_params"))
  times = {key: [] for key in variants}
  for _ in range(FLAGS.rounds):
    for key, variant in variants.items():
      times[key].append(variant.trial(FLAGS.steps))
  median = {key: float(np.median(v)) for key, v in times.items()}
  print(f"{'method':<10} {'space':<15}" + "".join(f"{f'T={t} ms':>10}" for t in counts)
        + "".join(f"{f'T={t} /ew':>10}" for t in counts))
  figures = {}
  for method in METHODS:
    row = [median[(method, "representation", t)] for t in counts]
    ratios = [median[(method, "representation", t)] / median[("equal", "representation", t)]
              for t in counts]
    print(f"{method:<10} {'representation':<15}" + "".join(f"{1e3 * v:>10.2f}" for v in row)
          + "".join(f"{r:>10.2f}" for r in ratios))
    for t, r in zip(counts, ratios):
      figures[f"{method}_vs_ew_T{t}"] = round(r, 3)
  if ("equal", "shared_params", 4) in median:
    for method in ["equal", *aggregators.AGGREGATORS]:
      ratio = median[(method, "shared_params", 4)] / median[("equal", "representation", 4)]
      print(f"{method:<10} {'shared_params':<15} T=4: {1e3 * median[(method, 'shared_params', 4)]:.2f}"
            f" ms, {ratio:.2f}x equal weighting")
      figures[f"{method}_params_vs_ew_T4"] = round(ratio, 3)
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
