"""jtl's train step against PyTorch on the same models, optimizer, batch and precision (CPU).

  pip install -e .[bench]      # PyTorch, for this benchmark only (never needed by `make test`)
  python -m experiments.bench.vs_pytorch [--models=mlp,cnn,resnet18,vit] [--batch=32]
      [--rounds=5] [--steps=0] [--torch_threads=0] [--compile=true] [--check=true]

Four architectures, written twice: jtl's registry models (`mlp`, `cnn_small`, `resnet18`, `vit_tiny`)
and PyTorch modules that mirror them layer for layer (same widths, norms, epsilons, pooling; the
parameter counts are printed and must match). Both sides train on one synthetic batch of 32x32x3
float32 images (NHWC for JAX, NCHW for PyTorch: each framework's native layout) with AdamW (lr 1e-3,
cosine schedule, weight decay 1e-4 on conv/linear kernels only), softmax cross-entropy, and the
accuracy and gradient-norm metrics that jtl's step reports. The jtl side is the real step
(`train.setup` + `train.make_train_step` on one device); the PyTorch side is eager mode and, as an
extra column, `torch.compile` on the model (skipped with a note when it fails).

Timing: compilation and `--warmup` steps first (not timed), then `--rounds` interleaved rounds of
about `--round_s` seconds, or `--steps` steps, per variant (jtl, torch eager, torch compiled, jtl, ...), block_until_ready on the JAX side; the
medians are compared, so load on the machine cancels out to first order. `--check` also loads each
PyTorch model's weights into the jtl model (torchvision/timm names via `jtl.pretrained` for resnet18
and vit, a direct mapping for mlp and cnn) and reports the largest logit difference, which shows
the two sides compute the same function.

PyTorch's OpenMP threads stall each other on a loaded machine, so by default each model's PyTorch
side runs with whichever of 1 thread and torch's default is faster at the time (`--torch_threads`
forces a count); see docs/performance.md.

Roofline: jtl's compiled GFLOPs per step (XLA's cost analysis of `JtlSide.step`) and each side's
achieved FLOP/s with that same count (same model, same batch) as a fraction of the float32 matmul
peak measured after the timed rounds (experiments/bench/roofline.py).

The last line printed is one JSON object: `<model>_vs_torch` = jtl steps/s / torch eager steps/s
(> 1: jtl faster), `<model>_vs_torch_compile` likewise against torch.compile, parameter counts, the
logit differences, `<model>_gflops_per_step`, `<model>_roofline_fraction` (per side) and
`matmul_peak_gflops`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments.bench.torch_models import (LR, NUM_CLASSES, TOTAL_STEPS, WEIGHT_DECAY, TorchSide,
                                            jtl_variables_from_torch)

MODELS = ("mlp", "cnn", "resnet18", "vit")
JTL_NAMES = {"mlp": "mlp", "cnn": "cnn_small", "resnet18": "resnet18", "vit": "vit_tiny"}
INSTALL_HINT = "pip install -e .[bench]"
DEFAULT_TORCH_THREADS = 1  # torch's own default, read in main()


def define_flags() -> None:
  """The command-line flags (defined only when run as a script, so importing this module is free)."""
  flags.DEFINE_list("models", list(MODELS), f"Subset of {','.join(MODELS)}.")
  flags.DEFINE_integer("batch", 32, "Batch size (both frameworks).")
  flags.DEFINE_integer("image_size", 32, "Square input side (3 channels).")
  flags.DEFINE_integer("vit_patch", 4, "ViT-tiny patch size (4: 64 patches + class token at 32x32).")
  flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds per model (the median is kept).")
  flags.DEFINE_integer("steps", 0, "Steps per timed round; 0: as many as fill --round_s (at least 1).")
  flags.DEFINE_float("round_s", 0.5, "Target seconds per variant and round when --steps=0.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
  flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads; 0: whichever of 1 and "
                       "torch's default is faster for each model right now (see docs/performance.md).")
  flags.DEFINE_boolean("compile", True, "Add a torch.compile column (skipped if it fails).")
  flags.DEFINE_boolean("check", True, "Load the torch weights into jtl and compare logits.")


FLAGS = flags.FLAGS


def parse_models(names: Sequence[str]) -> tuple[str, ...]:
  """Validated model subset, in the given order; ValueError names the valid choices."""
  names = tuple(n.strip() for n in names if n.strip())
  unknown = [n for n in names if n not in MODELS]
  if unknown or not names:
    raise ValueError(f"unknown model(s) {','.join(unknown) or '(none given)'}; "
                     f"--models takes a comma-separated subset of {','.join(MODELS)}")
  return names


def require_torch() -> Any:
  """Imports torch, or exits with one line saying how to install it."""
  try:
    import torch  # noqa: PLC0415  (optional benchmark dependency)
  except ImportError:
    raise SystemExit(f"vs_pytorch needs PyTorch, which is a benchmark-only extra: {INSTALL_HINT} "
                     "(CPU wheel torch==2.13.0)") from None
  return torch


def make_batch(batch: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32),
          "label": rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)}


def model_options(name: str, vit_patch: int) -> dict[str, Any]:
  return {"patch_size": vit_patch} if name == "vit" else {}


# ----------------------------------------------------------------------------------------- jtl side

def jtl_config(name: str, batch: int, vit_patch: int = 4):
  """A supervised config on one device: the model, AdamW with cosine decay, float32."""
  from experiments.configs.common import base_config  # noqa: PLC0415
  c = base_config()
  c.model.name = JTL_NAMES[name]
  c.model.num_classes = NUM_CLASSES
  c.model.update(model_options(name, vit_patch))
  c.batch_size = batch
  c.total_steps = TOTAL_STEPS
  c.optim.name, c.optim.lr, c.optim.weight_decay = "adamw", LR, WEIGHT_DECAY
  c.optim.schedule, c.optim.warmup_steps = "cosine", 0
  c.precision = "float32"
  c.mesh.axes = (("data", 1),)
  c.compilation_cache = "none"  # compile cost is excluded anyway; keep runs independent
  return c


class JtlSide:
  """The real jtl train step on one device, for one model and one batch."""

  def __init__(self, name: str, batch_np: dict[str, np.ndarray], vit_patch: int = 4,
               model_options: dict | None = None):
    import jax  # noqa: PLC0415
    from jtl import train  # noqa: PLC0415
    self.jax = jax
    config = jtl_config(name, len(batch_np["label"]), vit_patch)
    config.model.update(model_options or {})  # e.g. cpu_fast_paths=False
    self.setup = train.setup(config, batch_np)
    self.batch = jax.device_put(batch_np, self.setup.batch_sharding)
    self.step = train.make_train_step(self.setup)
    self.variables = train.fresh_variables(self.setup)
    self.state = train.initial_state(self.setup, *self.variables)
    params = self.setup.abstract_state.params
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

  def compile(self) -> float:
    """Compiles the step; sets `flops` (XLA's count per step) and returns the compile seconds."""
    from experiments.bench.roofline import compiled_flops  # noqa: PLC0415
    start = time.perf_counter()
    self.step = self.step.lower(self.state, self.batch).compile()
    seconds = time.perf_counter() - start
    self.flops = compiled_flops(self.step)
    return seconds

  def run(self, n: int) -> dict:
    metrics = None
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.batch)
    self.jax.block_until_ready(self.state)
    return metrics

  def logits(self, variables: dict, images: np.ndarray) -> np.ndarray:
    model = self.setup.objective.model
    return np.asarray(model.apply(variables, images, train=False))


def max_logit_difference(torch, name: str, jtl_side: JtlSide, torch_side: TorchSide) -> float:
  """Largest |logit difference| (eval mode, torch weights in both) over the benchmark batch."""
  import jax  # noqa: PLC0415
  module = torch_side.model
  with torch.no_grad():  # a non-zero head, so the check is not trivially 0 == 0
    module_head = module.fc if name == "resnet18" else module.head
    module_head.weight.normal_(0, 0.05)
  abstract = jax.eval_shape(lambda: {"params": jtl_side.variables[0], **jtl_side.variables[1]})
  variables = jtl_variables_from_torch(torch, name, module, abstract)
  images = np.asarray(jtl_side.batch["image"])
  return float(np.abs(jtl_side.logits(variables, images) - torch_side.logits()).max())


# ------------------------------------------------------------------------------------------ timing

def timed(side: Any, steps: int) -> float:
  start = time.perf_counter()
  side.run(steps)
  return time.perf_counter() - start


def interleaved(variants: dict[str, Any], rounds: int, steps: int, round_s: float
                ) -> tuple[dict[str, float], dict[str, int]]:
  """variants: label -> object with run(n) (warm). Returns (label -> median steps/s over `rounds`,
  label -> steps per round); `steps` 0 sizes each variant's round to about `round_s` seconds."""
  counts = {k: steps or max(1, round(round_s / timed(side, 1))) for k, side in variants.items()}
  rates: dict[str, list[float]] = {k: [] for k in variants}
  for _ in range(rounds):
    for label, side in variants.items():
      rates[label].append(counts[label] / timed(side, counts[label]))
  return {k: float(np.median(v)) for k, v in rates.items()}, counts


def pick_torch_threads(torch, side: TorchSide, threads: int) -> int:
  """Sets torch's intra-op threads: `threads`, or (0) the faster of 1 and torch's default.

  On a loaded machine torch's OpenMP threads wait for each other at every op (a descheduled thread
  stalls the rest), and one thread can be several times faster than two; XLA's thread pool is
  much less sensitive to this. Probing gives PyTorch its best setting under the current load.
  """
  if threads:
    torch.set_num_threads(threads)
    return threads
  candidates = sorted({DEFAULT_TORCH_THREADS, 1})
  times: dict[int, list[float]] = {n: [] for n in candidates}
  for _ in range(3):
    for n in candidates:
      torch.set_num_threads(n)
      side.run(1)
      times[n].append(timed(side, 1))
  best = min(candidates, key=lambda n: np.median(times[n]))
  torch.set_num_threads(best)
  return best


def bench_model(torch, name: str) -> dict[str, Any]:
  batch_np = make_batch(FLAGS.batch, FLAGS.image_size)
  jtl_side = JtlSide(name, batch_np, FLAGS.vit_patch)
  eager = TorchSide(torch, name, batch_np, FLAGS.vit_patch)
  row: dict[str, Any] = {"jtl_params": jtl_side.num_params, "torch_params": eager.num_params,
                         "jtl_compile_s": jtl_side.compile(), "fused_adamw": eager.fused}
  if FLAGS.check:
    row["max_logit_diff"] = max_logit_difference(torch, name, jtl_side, eager)
  eager.compile()
  row["torch_threads"] = pick_torch_threads(torch, eager, FLAGS.torch_threads)
  variants: dict[str, Any] = {"jtl": jtl_side, "torch": eager}
  if FLAGS.compile:
    try:
      compiled = TorchSide(torch, name, batch_np, FLAGS.vit_patch, compiled=True)
      row["torch_compile_s"] = compiled.compile()
      variants["torch_compile"] = compiled
    except Exception as e:  # noqa: BLE001  (inductor needs a C++ toolchain; any failure: skip)
      row["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
  for side in variants.values():
    side.run(FLAGS.warmup)
  row["steps_per_s"], row["steps_per_round"] = interleaved(variants, FLAGS.rounds, FLAGS.steps,
                                                          FLAGS.round_s)
  row["jtl_flops"] = jtl_side.flops
  return row


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    models = parse_models(FLAGS.models)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  for flag in ("batch", "image_size", "vit_patch", "rounds", "steps", "warmup", "torch_threads"):
    minimum = 0 if flag in ("steps", "warmup", "torch_threads") else 1
    if getattr(FLAGS, flag) < minimum:
      raise SystemExit(f"--{flag} must be >= {minimum}, got {getattr(FLAGS, flag)}")
  if FLAGS.image_size % FLAGS.vit_patch and "vit" in models:
    raise SystemExit(f"--vit_patch={FLAGS.vit_patch} must divide --image_size={FLAGS.image_size}")
  torch = require_torch()
  global DEFAULT_TORCH_THREADS
  DEFAULT_TORCH_THREADS = torch.get_num_threads()
  import jax  # noqa: PLC0415

  from experiments.bench import roofline  # noqa: PLC0415
  rows = {}
  for name in models:
    rows[name] = bench_model(torch, name)
    print(f"# {name}: done ({rows[name]['steps_per_s']})", file=sys.stderr, flush=True)
  peak = roofline.matmul_peak()

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"jtl (jax {jax.__version__}, {jax.devices()[0].platform}) vs torch {torch.__version__} "
        f"(default threads: {DEFAULT_TORCH_THREADS}), batch {FLAGS.batch}, {FLAGS.image_size}x"
        f"{FLAGS.image_size}x3 float32, AdamW; medians of {FLAGS.rounds} interleaved rounds "
        f"({FLAGS.steps or f'~{FLAGS.round_s:g} s'} per variant); load average {load:.1f} on "
        f"{os.cpu_count()} CPUs; matmul peak GFLOP/s {peak / 1e9:.1f}")
  header = (f"{'model':<10}{'params':>12}{'jtl st/s':>10}{'torch st/s':>12}{'threads':>8}"
            f"{'compile st/s':>14}"
            f"{'jtl/torch':>11}{'jtl/compile':>13}{'max|dlogit|':>13}"
            f"{'GFLOP/step':>11}{'jtl/peak':>9}{'torch/peak':>11}")
  print(header)
  figures: dict[str, Any] = {}
  for name, row in rows.items():
    rate = row["steps_per_s"]
    ratio = rate["jtl"] / rate["torch"]
    figures[f"{name}_vs_torch"] = round(ratio, 3)
    compiled = rate.get("torch_compile")
    if compiled:
      figures[f"{name}_vs_torch_compile"] = round(rate["jtl"] / compiled, 3)
    params = (f"{row['jtl_params']:,}" if row["jtl_params"] == row["torch_params"]
              else f"{row['jtl_params']:,}!={row['torch_params']:,}")
    diff = row.get("max_logit_diff")
    compiled_text = f"{compiled:.2f}" if compiled else "n/a"
    vs_compiled = f"{rate['jtl'] / compiled:.2f}" if compiled else "n/a"
    diff_text = f"{diff:.1e}" if diff is not None else "-"
    peak_fraction = {k: row["jtl_flops"] * v / peak for k, v in rate.items()}  # jtl's FLOPs for all
    print(f"{name:<10}{params:>12}{rate['jtl']:>10.2f}{rate['torch']:>12.2f}"
          f"{row['torch_threads']:>8}{compiled_text:>14}"
          f"{ratio:>11.2f}{vs_compiled:>13}{diff_text:>13}{row['jtl_flops'] / 1e9:>11.3f}"
          f"{peak_fraction['jtl']:>9.3f}{peak_fraction['torch']:>11.3f}")
    if "torch_compile_error" in row:
      print(f"  torch.compile skipped for {name}: {row['torch_compile_error']}")
    figures[f"{name}_params_match"] = row["jtl_params"] == row["torch_params"]
    figures[f"{name}_params"] = row["jtl_params"]
    if diff is not None:
      figures[f"{name}_max_logit_diff"] = float(f"{diff:.2e}")
    figures[f"{name}_compile_s"] = {"jtl": round(row["jtl_compile_s"], 1)}
    if "torch_compile_s" in row:
      figures[f"{name}_compile_s"]["torch_compile"] = round(row["torch_compile_s"], 1)
    figures[f"{name}_steps_per_s"] = {k: round(v, 3) for k, v in rate.items()}
    figures[f"{name}_torch_threads"] = row["torch_threads"]
    figures[f"{name}_gflops_per_step"] = round(row["jtl_flops"] / 1e9, 4)
    figures[f"{name}_roofline_fraction"] = {k: round(v, 4) for k, v in peak_fraction.items()}
  figures.update(batch=FLAGS.batch, rounds=FLAGS.rounds, load_average=round(load, 2),
                 matmul_peak_gflops=round(peak / 1e9, 1),
                 torch_default_threads=DEFAULT_TORCH_THREADS, jax=jax.__version__,
                 torch=torch.__version__)
  print(json.dumps(figures))


if __name__ == "__main__":
  define_flags()
  app.run(main)
