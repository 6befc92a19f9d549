"""Benchmark: step time of every multitask weighting and gradient aggregation relative to equal weighting.

  python -m experiments.bench.multitask [--tasks=2,4,8] [--batch_size=64] [--rounds=5] [--steps=10]

The real jtl train step (`jtl.train.make_train_step`) of `multitask_digits.py` (hard sharing, a
cnn_small trunk on 12x12 multi-digits), with T tasks (heads alternately predicting the left and right
digit), for each method, in representation space (one backward pass through the trunk: what makes
aggregation cheap) and, for the aggregators at T = 4, in shared-params space (T backward passes: what
PyTorch libraries such as LibMTL do). Rounds are interleaved and medians kept, so machine load
cancels out of the ratios. Each step's compiled GFLOPs (`GF`) and its achieved FLOP/s as a
fraction (`pk`) of the float32 matmul peak measured after the timed rounds
(experiments/bench/roofline.py; XLA counts a loop body once, which undercounts only the aggregators'
small T x T solver loops). The last line is one JSON object: `<method>_vs_ew_T<T>` (step time
over equal weighting's at the same T, representation space), `<method>_params_vs_ew_T4`,
`<method>_roofline_fraction_T<T>`, `<method>_params_roofline_fraction_T4` and `matmul_peak_gflops`.
"""
from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments.bench import roofline
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
    self.flops = roofline.compiled_flops(self.step, self.state, self.batch)  # jit's cache: free

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
  peak = roofline.matmul_peak()
  fraction = {key: roofline.fraction(v.flops, median[key], peak) for key, v in variants.items()}
  print(f"matmul peak GFLOP/s {peak / 1e9:.1f}")
  print(f"{'method':<10} {'space':<15}" + "".join(f"{f'T={t} ms':>10}" for t in counts)
        + "".join(f"{f'T={t} /ew':>10}" for t in counts)
        + "".join(f"{f'T={t} GF':>10}{f'T={t} pk':>8}" for t in counts))
  figures = {}
  for method in METHODS:
    keys = [(method, "representation", t) for t in counts]
    ratios = [median[k] / median[("equal", "representation", k[2])] for k in keys]
    print(f"{method:<10} {'representation':<15}"
          + "".join(f"{1e3 * median[k]:>10.2f}" for k in keys)
          + "".join(f"{r:>10.2f}" for r in ratios)
          + "".join(f"{variants[k].flops / 1e9:>10.3f}{fraction[k]:>8.3f}" for k in keys))
    for t, r, k in zip(counts, ratios, keys):
      figures[f"{method}_vs_ew_T{t}"] = round(r, 3)
      figures[f"{method}_roofline_fraction_T{t}"] = round(fraction[k], 4)
  if ("equal", "shared_params", 4) in median:
    for method in ["equal", *aggregators.AGGREGATORS]:
      key = (method, "shared_params", 4)
      ratio = median[key] / median[("equal", "representation", 4)]
      print(f"{method:<10} {'shared_params':<15} T=4: {1e3 * median[key]:.2f} ms, {ratio:.2f}x "
            f"equal weighting, {variants[key].flops / 1e9:.3f} GFLOP/step, {fraction[key]:.3f} of "
            "peak")
      figures[f"{method}_params_vs_ew_T4"] = round(ratio, 3)
      figures[f"{method}_params_roofline_fraction_T4"] = round(fraction[key], 4)
  figures["matmul_peak_gflops"] = round(peak / 1e9, 1)
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
