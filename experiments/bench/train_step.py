"""Benchmark of the train step: overhead, frozen-backbone savings, input pipeline.

  python -m experiments.bench.train_step [--model=resnet_small] [--batch_size=256] [--rounds=5]

Every figure is a ratio of two things measured in this process, interleaved round by round (medians),
so machine load cancels out:
  overhead_vs_minimal_jit   jtl step / a minimal hand-written jit step (same model, optimizer, batch)
  frozen_vs_full_step_time  linear-probe step / full fine-tune step
  frozen_vs_full_flops      compiled FLOPs, linear probe / full
  pipeline_vs_synthetic     steps/s fed by the real TFDS pipeline / fed by one in-memory batch
  full_roofline_fraction    the full step's achieved FLOP/s / this device's matmul peak
  probe_roofline_fraction   the same for the linear-probe step (experiments/bench/roofline.py)
  matmul_peak_gflops        that peak, in GFLOP/s (measured after the timed rounds)
The last line printed is one JSON object with these figures.
"""
from __future__ import annotations

import itertools
import json
import time

import jax
import numpy as np
import optax
from absl import app, flags

from experiments.bench import roofline
from experiments.configs import pretrain_digits
from jtl import data, losses, sharding, train

flags.DEFINE_string("model", "resnet_small", "Model name from jtl.models.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("image_size", None, "Resize the digits to this side (None: native 8x8).")
flags.DEFINE_integer("steps", 20, "Steps per timed trial.")
flags.DEFINE_integer("rounds", 5, "Interleaved trials per variant (the median is kept).")
FLAGS = flags.FLAGS
LINEAR_PROBE = (("params/head/.*", True), (".*", False))


def make_config(trainable=((".*", True),)):
  c = pretrain_digits.get_config()
  c.model.name = FLAGS.model
  c.batch_size = FLAGS.batch_size
  c.total_steps = 10_000
  c.data.augment = False
  c.data.image_size = FLAGS.image_size
  c.trainable = trainable
  return c


def setup(config):
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  first = next(batches)
  s = train.setup(config, first)
  return s, first, batches


def minimal_step_fn(s):
  """What a user would write by hand: value_and_grad + optax update, nothing else."""
  model = s.objective.model

  def step(params, model_state, opt_state, batch):
    def loss_fn(p):
      logits, new_state = model.apply({"params": p, **model_state}, batch["image"], train=True,
                                      mutable=list(model_state))
      return losses.softmax_cross_entropy(logits, batch["label"]).mean(), new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = s.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1, 2))


def time_steps(run_one, state, n):
  state = run_one(state)  # warm (compiled already); also syncs the previous trial
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(n):
    state = run_one(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / n, state


def interleaved(variants, rounds, steps):
  """variants: name -> (run_one, state). Returns name -> median seconds/step."""
  states = {k: v[1] for k, v in variants.items()}
  times = {k: [] for k in variants}
  for _ in range(rounds):
    for name, (run_one, _) in variants.items():
      t, states[name] = time_steps(run_one, states[name], steps)
      times[name].append(t)
  return {k: float(np.median(v)) for k, v in times.items()}


def main(argv):
  del argv
  full, first, batches = setup(make_config())
  probe, _, _ = setup(make_config(LINEAR_PROBE))
  batch = sharding.to_global(first, full.batch_sharding)

  full_step, probe_step = train.make_train_step(full), train.make_train_step(probe)
  minimal = minimal_step_fn(full)
  full_state = train.initial_state(full, *train.fresh_variables(full))
  probe_state = train.initial_state(probe, *train.fresh_variables(probe))
  params, model_state = train.fresh_variables(full)
  minimal_state = (params, model_state, full.tx.init(params))

  variants = {
      "jtl step (full)": (lambda st: full_step(st, batch)[0], full_state),
      "minimal jit step (full)": (lambda st: minimal(*st, batch)[:3], minimal_state),
      "jtl step (linear probe)": (lambda st: probe_step(st, batch)[0], probe_state),
  }
  times = interleaved(variants, FLAGS.rounds, FLAGS.steps)

  flops = {name: roofline.compiled_flops(train.make_train_step(s), s.abstract_state,
                                         s.abstract_batch)
           for name, s in (("full", full), ("probe", probe))}

  # Input pipeline: the same jitted step, fed by the real pipeline vs one batch already on device.
  def loop(batch_source, state, n):
    start = time.perf_counter()
    for b in itertools.islice(batch_source, n):
      state, _ = full_step(state, b)
    jax.block_until_ready(state)
    return n / (time.perf_counter() - start), state

  n = FLAGS.steps * 2
  real = sharding.prefetch_to_mesh(batches, full.batch_sharding)
  state = train.initial_state(full, *train.fresh_variables(full))
  _, state = loop(real, state, 5)  # warm the pipeline
  real_rates, synth_rates = [], []
  for _ in range(FLAGS.rounds):
    r, state = loop(real, state, n)
    real_rates.append(r)
    r, state = loop(itertools.repeat(batch), state, n)
    synth_rates.append(r)

  figures = {
      "overhead_vs_minimal_jit": times["jtl step (full)"] / times["minimal jit step (full)"],
      "frozen_vs_full_step_time": times["jtl step (linear probe)"] / times["jtl step (full)"],
      "frozen_vs_full_flops": flops["probe"] / flops["full"],
      "pipeline_vs_synthetic": float(np.median(real_rates) / np.median(synth_rates)),
  }
  peak = roofline.matmul_peak()
  for name, key in (("full", "jtl step (full)"), ("probe", "jtl step (linear probe)")):
    figures[f"{name}_roofline_fraction"] = roofline.fraction(flops[name], times[key], peak)
  figures["matmul_peak_gflops"] = peak / 1e9
  print(f"model={FLAGS.model} batch={FLAGS.batch_size} image={first['image'].shape[1:]} "
        f"devices={jax.device_count()} "
        f"({jax.devices()[0].platform}), medians of {FLAGS.rounds} interleaved rounds")
  print(f"{'variant':<28}{'ms/step':>10}")
  for name, t in times.items():
    print(f"{name:<28}{t * 1e3:>10.3f}")
  print(f"{'compiled GFLOPs full':<28}{flops['full'] / 1e9:>10.3f}")
  print(f"{'compiled GFLOPs probe':<28}{flops['probe'] / 1e9:>10.3f}")
  print(f"{'steps/s real pipeline':<28}{np.median(real_rates):>10.1f}")
  print(f"{'steps/s in-memory batch':<28}{np.median(synth_rates):>10.1f}")
  print(f"{'matmul peak GFLOP/s':<28}{peak / 1e9:>10.1f}")
  print(f"{'full: fraction of peak':<28}{figures['full_roofline_fraction']:>10.3f}")
  print(f"{'probe: fraction of peak':<28}{figures['probe_roofline_fraction']:>10.3f}")
  print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
  app.run(main)
