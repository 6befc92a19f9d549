"""Benchmark of the two-tower losses on the global batch: CLIP, SigLIP, and SigLIP ring-chunked.

  python -m experiments.bench.contrastive [--batch_sizes=512,1024,2048,4096] [--dim=64] [--rounds=5]

On 8 fake CPU devices (set here unless XLA_FLAGS already asks for devices), embeddings [B, dim]
sharded along "data", for each loss and global batch size B: the time of one jitted
value-and-gradient (w.r.t. both embeddings and the learnable scalars; median of interleaved rounds)
and the compiled per-device temporary memory (`.compile().memory_analysis().temp_size_in_bytes`).
The plain losses build the [B_local, B] logits per device (XLA all-gathers one side); the chunked
SigLIP keeps one [B_local, B_local] block at a time, so its memory should tend to ~1/n of the plain
one for n devices. Roofline: the compiled GFLOPs per call (XLA counts per device; the fake devices
share the machine's cores, so the count is summed over devices), GFLOP/s and their fraction of the
float32 matmul peak measured after the timed rounds (experiments/bench/roofline.py). The chunked
loss is charged plain SigLIP's FLOPs (the same pairwise logits; XLA would count its ring's scan
body once). The last line is one JSON object of figures measured in this process:
  siglip_chunked_vs_plain_temp_bytes   chunked / plain SigLIP temp memory at the largest B
  siglip_chunked_vs_plain_time         chunked / plain SigLIP time at the largest B
  siglip_plain_temp_growth_per_2x_batch  plain temp memory at the largest B / at the one before it
                                       (the default sizes double: ~4 means quadratic)
  siglip_chunked_temp_growth_per_2x_batch  the same for the chunked loss
  clip_vs_siglip_time                  CLIP (softmax) / SigLIP (sigmoid) plain time, largest B
  <loss>_roofline_fraction             achieved FLOP/s / matmul peak, each loss at the largest B
  matmul_peak_gflops                   that peak, in GFLOP/s

Gradient accumulation (`--accum_batch`, `--accum_k`; `--parts=accumulation` runs only this): one
SimCLR train step of simclr_digits.py (its cnn_small encoder, the trainer's jitted step on the same
mesh) on a global batch of `accum_batch` three ways: k = 1 (the whole batch at once), gradient
caching with `grad_accum_steps=k` (every negative of the whole batch, `Contrastive.
accumulated_gradients`), and naive accumulation (the same k micro-batches, each its own contrastive
loss with b - 1 negatives: the objective's `accumulated_gradients` switched off). Columns: median
step time, compiled per-device temporary memory, the step's contrastive loss (the naive one differs:
fewer negatives). Figures:
  cache_vs_whole_temp_bytes / cache_vs_whole_time   gradient caching / k = 1
  naive_vs_whole_temp_bytes / naive_vs_whole_time   naive accumulation / k = 1
  cache_vs_whole_loss_rel_diff                       |cache loss - whole loss| / whole loss: float
                                       rounding without BatchNorm; cnn_small's BatchNorm normalises each
                                       micro-batch by its own statistics (docs/accumulation.md), ~2e-3
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from experiments.bench import roofline  # noqa: E402
from experiments.configs import simclr_digits  # noqa: E402
from jtl import data, sharding, train  # noqa: E402
from jtl.losses import contrastive as cl  # noqa: E402

flags.DEFINE_list("batch_sizes", ["512", "1024", "2048", "4096"], "Global batch sizes.")
flags.DEFINE_integer("dim", 64, "Embedding dimension.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (the median is kept).")
flags.DEFINE_integer("iters", 3, "Calls per timed round.")
flags.DEFINE_list("parts", ["losses", "accumulation"], "Which benchmarks: losses, accumulation.")
flags.DEFINE_integer("accum_batch", 512, "Global batch of the accumulation benchmark.")
flags.DEFINE_integer("accum_k", 4, "grad_accum_steps of the accumulation benchmark.")
FLAGS = flags.FLAGS


def loss_fns(mesh: Mesh) -> dict:
  """name -> f(image, text, scalars) -> mean loss (scalars: learnable log-scale / log-t, bias)."""
  return {
      "clip": lambda image, text, s: jnp.mean(cl.clip_loss(image, text, s["log_t"])),
      "siglip": lambda image, text, s: jnp.mean(cl.siglip_loss(image, text, s["log_t"], s["b"])),
      "siglip_chunked": lambda image, text, s: jnp.mean(
          cl.siglip_loss_chunked(image, text, s["log_t"], s["b"], mesh=mesh, axis="data")),
  }


def compiled(fn, mesh: Mesh, batch: int, dim: int):
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)),
                 in_shardings=(sharded, sharded, replicated))
  args = (jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharded),
          jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharded),
          {"log_t": jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
           "b": jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)})
  return step.lower(*args).compile()


def inputs(mesh: Mesh, batch: int, dim: int):
  rng = np.random.RandomState(0)
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  image = jax.device_put(rng.randn(batch, dim).astype(np.float32), sharded)
  text = jax.device_put(rng.randn(batch, dim).astype(np.float32), sharded)
  scalars = {"log_t": jnp.float32(math.log(10.0)), "b": jnp.float32(-10.0)}
  return image, text, jax.device_put(scalars, NamedSharding(mesh, PartitionSpec()))


def time_call(executable, args, iters: int) -> float:
  jax.block_until_ready(executable(*args))
  start = time.perf_counter()
  for _ in range(iters):
    out = executable(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def accumulation_setups(batch: int, k: int) -> dict:
  """name -> train.Setup of one SimCLR step: whole batch, gradient caching, naive accumulation."""
  setups = {}
  for name, accum in (("whole", 1), ("cache", k), ("naive", k)):
    config = simclr_digits.get_config()
    config.update_from_flattened_dict({"batch_size": batch, "grad_accum_steps": accum})
    example = next(data.train_iterator(config.data, global_batch_size=batch, seed=1))
    s = train.setup(config, example)
    if name == "naive":  # each micro-batch its own loss: the objective does not take over the step
      objective = copy.copy(s.objective)
      objective.accumulated_gradients = lambda *args, **kwargs: None
      s = dataclasses.replace(s, objective=objective)
    setups[name] = (s, example)
  return setups


def accumulation(batch: int, k: int) -> dict:
  """Times, temp memory and losses of the three ways (docstring); prints the table."""
  rows = {}
  runs = {}
  for name, (s, example) in accumulation_setups(batch, k).items():
    step = train.make_train_step(s)
    executable = step.lower(s.abstract_state, s.abstract_batch).compile()
    params, model_state = train.fresh_variables(s)
    global_batch = sharding.to_global(example, s.batch_sharding)
    runs[name] = (executable, train.initial_state(s, params, model_state), global_batch)
    rows[name] = {"temp_bytes": executable.memory_analysis().temp_size_in_bytes, "ms": []}
  for _ in range(FLAGS.rounds):  # interleaved rounds; each call gets a fresh copy (the step donates)
    for name, (executable, state, global_batch) in runs.items():
      fresh = jax.tree.map(jnp.copy, state)
      jax.block_until_ready(fresh)
      start = time.perf_counter()
      _, metrics = executable(fresh, global_batch)
      jax.block_until_ready(metrics)
      rows[name]["ms"].append(1e3 * (time.perf_counter() - start))
      rows[name]["loss"] = float(metrics["contrastive_loss"])
  print(f"\nSimCLR step (simclr_digits.py, cnn_small) on a global batch of {batch}, "
        f"{len(jax.devices())} devices; k = {k} micro-batches of {batch // k}")
  print(f"{'way':<34}{'ms':>10}{'temp MiB':>11}{'loss':>10}")
  labels = {"whole": "k = 1 (whole batch)", "cache": f"gradient caching, k = {k}",
            "naive": f"naive accumulation, k = {k}"}
  for name, r in rows.items():
    r["ms"] = float(np.median(r["ms"]))
    print(f"{labels[name]:<34}{r['ms']:>10.1f}{r['temp_bytes'] / 2**20:>11.2f}{r['loss']:>10.4f}")
  ratio = lambda a, key: round(rows[a][key] / max(rows["whole"][key], 1e-12), 4)  # noqa: E731
  return {"cache_vs_whole_temp_bytes": ratio("cache", "temp_bytes"),
          "cache_vs_whole_time": ratio("cache", "ms"),
          "naive_vs_whole_temp_bytes": ratio("naive", "temp_bytes"),
          "naive_vs_whole_time": ratio("naive", "ms"),
          "cache_vs_whole_loss_rel_diff": float(f"{abs(rows['cache']['loss'] - rows['whole']['loss']) / abs(rows['whole']['loss']):.2e}")}


def main(argv):
  del argv
  figures = {}
  if "losses" in FLAGS.parts:
    figures.update(losses_benchmark())
  if "accumulation" in FLAGS.parts:
    figures.update(accumulation(FLAGS.accum_batch, FLAGS.accum_k))
  print(json.dumps(figures))


def losses_benchmark() -> dict:
  """The two-tower losses at each batch size (docstring); prints the table, returns the figures."""
  devices = jax.devices()
  mesh = Mesh(np.asarray(devices), ("data",))
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  fns = loss_fns(mesh)
  results = {}  # (name, batch) -> {"ms": ..., "temp_bytes": ..., "flops": ...}
  cpu_devices = len(devices) if devices[0].platform == "cpu" else 1  # they share the cores
  for batch in batch_sizes:
    executables = {name: compiled(fn, mesh, batch, FLAGS.dim) for name, fn in fns.items()}
    args = inputs(mesh, batch, FLAGS.dim)
    times = {name: [] for name in fns}
    for _ in range(FLAGS.rounds):  # interleaved, so machine load hits every variant alike
      for name, executable in executables.items():
        times[name].append(time_call(executable, args, FLAGS.iters))
    plain_siglip = roofline.compiled_flops(executables["siglip"])  # chunked's too (docstring)
    for name, executable in executables.items():
      temp = executable.memory_analysis().temp_size_in_bytes
      flops = plain_siglip if name == "siglip_chunked" else roofline.compiled_flops(executable)
      results[(name, batch)] = {"ms": 1e3 * float(np.median(times[name])), "temp_bytes": temp,
                                "flops": flops * cpu_devices}
  peak = roofline.matmul_peak()

  print(f"{len(devices)} {devices[0].platform} devices, embeddings [B, {FLAGS.dim}] sharded on "
        "'data'; value and gradient; time = median of interleaved rounds; temp = per-device "
        f"compiled temporary memory; matmul peak GFLOP/s {peak / 1e9:.1f}")
  print(f"{'loss':<16}{'B':>7}{'ms':>10}{'temp MiB':>11}{roofline.HEADER}")
  for (name, batch), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"{name:<16}{batch:>7}{r['ms']:>10.2f}{r['temp_bytes'] / 2**20:>11.2f}"
          f"{roofline.columns(r['flops'], r['ms'] / 1e3, peak)}")
  big, half = batch_sizes[-1], batch_sizes[-2] if len(batch_sizes) > 1 else batch_sizes[-1]
  ratio = lambda a, b, key: round(results[a][key] / max(results[b][key], 1e-12), 4)  # noqa: E731
  figures = {
      "siglip_chunked_vs_plain_temp_bytes": ratio(("siglip_chunked", big), ("siglip", big),
                                                  "temp_bytes"),
      "siglip_chunked_vs_plain_time": ratio(("siglip_chunked", big), ("siglip", big), "ms"),
      "siglip_plain_temp_growth_per_2x_batch": ratio(("siglip", big), ("siglip", half),
                                                     "temp_bytes"),
      "siglip_chunked_temp_growth_per_2x_batch": ratio(("siglip_chunked", big),
                                                       ("siglip_chunked", half), "temp_bytes"),
      "clip_vs_siglip_time": ratio(("clip", big), ("siglip", big), "ms"),
  }
  for name in fns:
    r = results[(name, big)]
    fraction = roofline.fraction(r["flops"], r["ms"] / 1e3, peak)
    figures[f"{name}_roofline_fraction"] = round(fraction, 4)
  figures["matmul_peak_gflops"] = round(peak / 1e9, 1)
  return figures


if __name__ == "__main__":
  app.run(main)
