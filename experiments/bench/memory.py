"""Benchmark: memory and time of mixed precision, gradient accumulation and rematerialisation; the
compilation cache's cold vs warm first step.

  python -m experiments.bench.memory [--model=resnet_small] [--image_size=16] [--batch_size=64]

Per variant of the real jtl train step (one CPU device): the compiled step's temporary memory (XLA's
memory analysis: activations and workspace) and step time (interleaved rounds, medians), relative to
the float32 baseline (the accumulation variant does 4x the work of the others; on CPU its
convolutions run as matmuls, since XLA:CPU's convolutions are ~25x slower inside a loop: see
jtl/models/cpu_ops.py), and its roofline: compiled GFLOPs per step (XLA counts a loop
body once, so the accumulation step is charged those of one plain step on its 4x batch), GFLOP/s and
their fraction of the float32 matmul peak measured after the timed rounds
(experiments/bench/roofline.py; bfloat16 is held to the same float32 peak). Then the first step of a
fresh process (compile included) with an empty compilation cache and again with the cache it left.
The last line is one JSON object: `<variant>_temp_memory_vs_f32`, `<variant>_step_time_vs_f32`,
`<variant>_roofline_fraction`, `first_step_warm_vs_cold` and `matmul_peak_gflops`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from experiments.bench import roofline
from experiments.configs import pretrain_digits
from jtl import data, train
from jtl.sharding import to_global

flags.DEFINE_string("model", "resnet_small", "Registry model.")
flags.DEFINE_integer("image_size", 16, "Digits resized to this side.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (the accumulation variant uses 4x).")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 5, "Steps per round.")
flags.DEFINE_bool("child", False, "Internal: time one first step in this process.")
FLAGS = flags.FLAGS


def make_config(**overrides):
  c = pretrain_digits.get_config()
  c.model.name = FLAGS.model
  c.data.image_size = FLAGS.image_size
  c.data.augment = False
  c.batch_size = FLAGS.batch_size
  c.total_steps = 10_000
  c.mesh.axes = (("data", 1),)
  for key, value in overrides.items():
    if key.startswith("model."):
      with c.model.unlocked():
        c.model[key[6:]] = value
    else:
      c[key] = value
  return c


class Variant:
  def __init__(self, config):
    batch = next(data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0))
    self.setup = s = train.setup(config, batch)
    self.step = train.make_train_step(s)
    compiled = self.step.lower(s.abstract_state, s.abstract_batch).compile()
    self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    self.flops = roofline.compiled_flops(compiled)
    self.state = train.initial_state(s, *train.fresh_variables(s))
    self.batch = to_global(batch, s.batch_sharding)
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)

  def trial(self, steps):
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def step_flops(config) -> float:
  batch = next(data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0))
  s = train.setup(config, batch)
  return roofline.compiled_flops(train.make_train_step(s), s.abstract_state, s.abstract_batch)


def first_step_seconds(cache_dir: str) -> float:
  """A fresh process: setup, compile and run one step with the given compilation cache."""
  env = {**os.environ, "JTL_COMPILATION_CACHE": cache_dir, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-m", "experiments.bench.memory", "--child",
                        f"--model={FLAGS.model}", f"--image_size={FLAGS.image_size}",
                        f"--batch_size={FLAGS.batch_size}"], env=env, capture_output=True, text=True,
                       check=True)
  return float(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.child:  # one timed first step (compile + run), nothing else
    from jtl import compile_cache
    compile_cache.enable()
    config = make_config()
    batch = next(data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0))
    start = time.perf_counter()
    s = train.setup(config, batch)
    state = train.initial_state(s, *train.fresh_variables(s))
    state, metrics = train.make_train_step(s)(state, to_global(batch, s.batch_sharding))
    jax.block_until_ready(metrics)
    print(time.perf_counter() - start)
    return
  variants = {
      "float32": Variant(make_config()),
      "bfloat16": Variant(make_config(precision="bfloat16")),
      "remat": Variant(make_config(**{"model.remat": True})),
      "accumulate 4 x batch": Variant(make_config(batch_size=4 * FLAGS.batch_size,
                                                  grad_accum_steps=4)),
  }
  # XLA counts the accumulation loop's body once: charge the same arithmetic without the loop.
  variants["accumulate 4 x batch"].flops = step_flops(make_config(batch_size=4 * FLAGS.batch_size))
  times = {name: [] for name in variants}
  for _ in range(FLAGS.rounds):
    for name, variant in variants.items():
      times[name].append(variant.trial(FLAGS.steps))
  peak = roofline.matmul_peak()
  base_time = np.median(times["float32"])
  base_mem = variants["float32"].temp_bytes
  print(f"{FLAGS.model} at {FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch_size}, one CPU "
        f"device; matmul peak GFLOP/s {peak / 1e9:.1f}")
  print(f"{'variant':<22}{'temp MiB':>10}{'vs f32':>8}{'ms/step':>10}{'vs f32':>8}"
        f"{roofline.HEADER}")
  figures = {}
  for name, variant in variants.items():
    t = np.median(times[name])
    print(f"{name:<22}{variant.temp_bytes / 2**20:>10.1f}{variant.temp_bytes / base_mem:>8.2f}"
          f"{1e3 * t:>10.1f}{t / base_time:>8.2f}{roofline.columns(variant.flops, t, peak)}")
    key = name.split()[0]
    figures[f"{key}_temp_memory_vs_f32"] = round(variant.temp_bytes / base_mem, 3)
    figures[f"{key}_step_time_vs_f32"] = round(float(t / base_time), 3)
    figures[f"{key}_roofline_fraction"] = round(roofline.fraction(variant.flops, t, peak), 4)
  with tempfile.TemporaryDirectory() as cache:
    cold = first_step_seconds(cache)
    warm = first_step_seconds(cache)
  print(f"first step of a fresh process: cold cache {cold:.1f} s, warm cache {warm:.1f} s")
  figures["first_step_warm_vs_cold"] = round(warm / cold, 3)
  figures["matmul_peak_gflops"] = round(peak / 1e9, 1)
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
