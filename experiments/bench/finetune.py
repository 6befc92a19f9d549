"""Benchmark of the fine-tuning methods of finetune_digits.py: what each costs and what it gets.

  python -m experiments.bench.finetune [--workdir=/tmp/jtl/bench_finetune] [--batch_size=256] \
      [--rounds=5] [--steps=10] [--seeds=0,1,2] [--shots=1] [--noaccuracy]

Cost, for every method on the same model (cnn_small) and the same batch (`--batch_size` digits, one
device), the real jtl train step (`jtl.train.make_train_step`) of the method's config:
  trainable       trainable parameters (LoRA: adapters + head)
  opt bytes       optimizer-state bytes (AdamW moments of the trainable leaves only)
  step / full     step time over full fine-tuning's, medians of interleaved rounds
  flops / full    compiled FLOPs (XLA cost analysis) over full fine-tuning's
  GFLOP/step      those FLOPs; `GFLOP/s` per second, `of peak` as a fraction of the float32 matmul
                  peak measured after the timed rounds (experiments/bench/roofline.py)
For the phased methods (lpft, unfreeze) time and FLOPs are the mean over the run's steps (each phase
weighted by its share of the steps), trainable and bytes their peak (the last phase trains all).
Benefit: target test accuracy on the demo's transfer task (digits 5-9, `--shots` labelled examples per
class, the mean over `shots_seed` in `--seeds`, min-max in brackets), each method trained with its own
config for 200 steps from one pretraining (digits 0-4, 400 steps, run once into WORKDIR/pretrain and
reused). The last line is one JSON object: `<method>_vs_full_step_time`, `<method>_vs_full_flops`,
`<method>_opt_state_bytes_vs_full`, `<method>_trainable_vs_full`, `<method>_roofline_fraction`,
`<method>_accuracy` and `matmul_peak_gflops`.
"""
from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from experiments.bench import roofline
from experiments.configs import finetune_digits, pretrain_digits
from jtl import data, evaluate, masks, phases, train
from jtl.metric_writer import read_jsonl
from jtl.sharding import to_global

flags.DEFINE_string("workdir", "/tmp/jtl/bench_finetune", "Where the runs go (reused if present).")
flags.DEFINE_integer("batch_size", 256, "Global batch size of the timed steps.")
flags.DEFINE_integer("steps", 10, "Steps per timed trial.")
flags.DEFINE_integer("rounds", 5, "Interleaved trials per variant (the median is kept).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "shots_seed values of the accuracy runs.")
flags.DEFINE_integer("shots", 1, "Labelled target examples per class.")
flags.DEFINE_bool("accuracy", True, "Train and evaluate every method (--noaccuracy: costs only).")
FLAGS = flags.FLAGS
METHODS = finetune_digits.METHODS


def method_config(method: str, pretrain: str) -> ml_collections.ConfigDict:
  c = finetune_digits.get_config(f"method={method},shots={FLAGS.shots},pretrain={pretrain}")
  c.mesh.axes = (("data", 1),)
  return c


class PhaseStep:
  """One phase of a method: its compiled step, state, and static figures."""

  def __init__(self, config: ml_collections.ConfigDict, phase: phases.Phase, batch):
    s = train.setup(config, batch, phase)
    self.weight = (phase.end - phase.start) / config.total_steps
    trainable, _ = masks.partition(s.abstract_state.params, s.trainable)
    self.trainable = masks.count(trainable)[0]
    self.opt_bytes = masks.count(s.abstract_state.opt_state)[1]
    self.step = train.make_train_step(s)
    self.flops = roofline.compiled_flops(self.step, s.abstract_state, s.abstract_batch)
    self.state = train.initial_state(s, *train.fresh_variables(s))
    self.batch = to_global(batch, s.batch_sharding)
    self.state, metrics = self.step(self.state, self.batch)  # warm
    jax.block_until_ready(metrics)

  def trial(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / steps


def costs(batch) -> dict[str, dict[str, float]]:
  """Per method: trainable, opt_bytes, seconds per step, flops (see the module docstring)."""
  variants = {}
  for method in METHODS:
    config = method_config(method, "/nonexistent")  # init_from is not read: fresh weights
    config.batch_size = FLAGS.batch_size
    config.init_from.workdir = None
    variants[method] = [PhaseStep(config, p, batch) for p in phases.schedule(config)]
  times = {(m, i): [] for m, steps in variants.items() for i in range(len(steps))}
  for _ in range(FLAGS.rounds):
    for (method, i) in times:
      times[(method, i)].append(variants[method][i].trial(FLAGS.steps))
  out = {}
  for method, steps in variants.items():
    out[method] = dict(
        trainable=max(p.trainable for p in steps), opt_bytes=max(p.opt_bytes for p in steps),
        seconds=sum(p.weight * float(np.median(times[(method, i)])) for i, p in enumerate(steps)),
        flops=sum(p.weight * p.flops for p in steps))
  return out


def accuracy(config: ml_collections.ConfigDict, workdir: epath.Path) -> float:
  train.train(config, str(workdir))
  rows = [r for r in read_jsonl(workdir / "eval_metrics.jsonl") if r["step"] == config.total_steps]
  if not rows:
    rows = evaluate.evaluate_checkpoints(config, str(workdir), step=config.total_steps)
  return float(rows[-1]["test/accuracy"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = epath.Path(FLAGS.workdir)
  pretrain = root / "pretrain"
  pre_config = pretrain_digits.get_config()
  pre_config.mesh.axes = (("data", 1),)
  accs = {method: [float("nan")] for method in METHODS}
  if FLAGS.accuracy:
    print(f"pretrain (digits 0-4) test accuracy: {accuracy(pre_config, pretrain):.3f}", flush=True)
  for method in METHODS if FLAGS.accuracy else ():
    accs[method] = []
    for seed in FLAGS.seeds:
      config = method_config(method, str(pretrain))
      config.data.shots_seed = int(seed)
      accs[method].append(accuracy(config, root / f"{method}_k{FLAGS.shots}_s{seed}"))
    logging.warning("%s: %s", method, accs[method])
  example = method_config("full", str(pretrain))
  example.data.augment = False
  batch = next(data.train_iterator(example.data, global_batch_size=FLAGS.batch_size, seed=0))
  cost = costs(batch)
  peak = roofline.matmul_peak()
  full = cost["full"]
  print(f"\ncnn_small on 8x8 digits, batch {FLAGS.batch_size}, {jax.devices()[0].platform}, medians "
        f"of {FLAGS.rounds} interleaved rounds; accuracy: digits 5-9, {FLAGS.shots} shot(s), mean "
        f"(min-max) over shots_seed {','.join(FLAGS.seeds)}; matmul peak GFLOP/s "
        f"{peak / 1e9:.1f}")
  print(f"{'method':<13}{'trainable':>11}{'opt bytes':>11}{'ms/step':>9}{'step/full':>10}"
        f"{'flops/full':>11}{roofline.HEADER}  {'target test acc':<20}")
  figures = {}
  for method in METHODS:
    c, a = cost[method], accs[method]
    print(f"{method:<13}{c['trainable']:>11,}{c['opt_bytes']:>11,}{c['seconds'] * 1e3:>9.2f}"
          f"{c['seconds'] / full['seconds']:>10.3f}{c['flops'] / full['flops']:>11.3f}"
          f"{roofline.columns(c['flops'], c['seconds'], peak)}  "
          + (f"{np.mean(a):.3f} ({min(a):.2f}-{max(a):.2f})" if FLAGS.accuracy else "-"))
    if method != "full":
      figures[f"{method}_vs_full_step_time"] = c["seconds"] / full["seconds"]
      figures[f"{method}_vs_full_flops"] = c["flops"] / full["flops"]
      figures[f"{method}_opt_state_bytes_vs_full"] = c["opt_bytes"] / full["opt_bytes"]
      figures[f"{method}_trainable_vs_full"] = c["trainable"] / full["trainable"]
    figures[f"{method}_roofline_fraction"] = roofline.fraction(c["flops"], c["seconds"], peak)
    if FLAGS.accuracy:
      figures[f"{method}_accuracy"] = float(np.mean(a))
  figures["matmul_peak_gflops"] = peak / 1e9
  print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
  app.run(main)
