"""XLA:CPU options against the default, on jtl's real train step (default: cnn_small, batch 128).

  python -m experiments.bench.xla_cpu_flags [--model=cnn] [--batch=128] [--rounds=5]
      [--settings=onednn,xnnpack,...]

XLA reads XLA_FLAGS once per process (and an unknown flag aborts it), so each setting runs in its
own worker process. A worker with the default flags stays alive for the whole run; each other
setting gets a worker in turn, and the two are timed in alternation (`--rounds` rounds of about
`--round_s` seconds each, default first), so both see the same machine load, as in-process
interleaving would. The figure is median(default s/step) / median(setting s/step): > 1 is faster.

Numerics: every worker first runs `--check_steps` steps from the same initial state and batch and
reports the losses, gradient norms and the parameter update; the table shows the largest loss
difference, the largest relative gradient-norm difference, the relative L2 difference of the update
after those steps (||u - u_default|| / ||u_default||; Adam normalises each gradient by its running
RMS, so rounding noise in near-zero gradients shows up here much magnified), and whether NaN still
propagates through max/isnan (fast-math may drop it, which would break `skip_nonfinite_updates`).

Roofline (`of peak`): each setting's achieved FLOP/s, counted with the default worker's compiled
FLOPs per step (the same model and batch: every setting is charged the same arithmetic, whatever
its rewrites), as a fraction of the float32 matmul peak the default worker measures after all the
timed rounds (experiments/bench/roofline.py).

Last line: a JSON object {setting: speed-up, <setting>_rel_update_diff, <setting>_nan_ok,
<setting>_roofline_fraction, ..., gflops_per_step, matmul_peak_gflops}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

SETTINGS = {
    "default": "",
    "thunk_runtime_false": "--xla_cpu_use_thunk_runtime=false",  # deprecated no-op in jax 0.10
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "onednn_fusion": ("--xla_cpu_use_onednn=true "
                      "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusion": ("--xla_cpu_use_xnnpack=true "
                   "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    "xnn_graph_greedy": ("--xla_cpu_use_xnnpack=true "
                         "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    "ynn_conv_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",  # XLA's own (Eigen) dots
    "xnn_dot": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=true "
                "--xla_cpu_experimental_xnn_fusion_type=dot"),
    "opt_preset_fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
}

flags.DEFINE_string("model", "cnn", "Model (short name of experiments.bench.vs_pytorch).")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("image_size", 32, "Square input side (3 channels).")
flags.DEFINE_list("settings", [s for s in SETTINGS if s != "default"], "Settings to compare.")
flags.DEFINE_integer("rounds", 5, "Alternating timed rounds per setting (medians kept).")
flags.DEFINE_float("round_s", 1.0, "Target seconds per timed round.")
flags.DEFINE_integer("check_steps", 3, "Steps of the numerical check.")
flags.DEFINE_string("worker_out", None, "(internal) be a worker; write the check arrays here.")
FLAGS = flags.FLAGS


def worker() -> None:
  """Compiles and checks under this process's XLA_FLAGS, then answers `run N` (times N steps) and
  `peak` (measures the matmul peak) commands from stdin."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from experiments.bench.roofline import matmul_peak  # noqa: PLC0415
  from experiments.bench.vs_pytorch import JtlSide, make_batch  # noqa: PLC0415

  def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])

  side = JtlSide(FLAGS.model, make_batch(FLAGS.batch, FLAGS.image_size))
  initial = jax.tree.map(np.asarray, side.state)  # the step donates the state: keep a host copy
  compile_s = side.compile()
  metrics = [side.run(1) for _ in range(FLAGS.check_steps)]
  losses = [float(m["loss"]) for m in metrics]
  grad_norms = [float(m["grad_norm"]) for m in metrics]
  update = flat(side.state.params) - flat(initial.params)
  nan = jnp.array([1.0, jnp.nan])
  nan_ok = bool(jax.jit(lambda x: jnp.isnan(jnp.max(x)) & jnp.isnan(x).any())(nan))
  np.savez(FLAGS.worker_out, update=update, losses=np.array(losses),
           grad_norms=np.array(grad_norms))
  side.run(2)  # warm
  start = time.perf_counter()
  side.run(1)
  print(json.dumps({"compile_s": compile_s, "nan_ok": nan_ok, "flops": side.flops,
                    "step_s": time.perf_counter() - start}), flush=True)
  for line in sys.stdin:
    if line.startswith("peak"):
      print(matmul_peak(), flush=True)
      continue
    if not line.startswith("run "):
      break
    start = time.perf_counter()
    side.run(int(line.split()[1]))
    print(time.perf_counter() - start, flush=True)


class Worker:
  """A worker process under one setting's XLA flags."""

  def __init__(self, name: str, tmp: str, tag: str = ""):
    self.name, self.out = name, os.path.join(tmp, f"{name}{tag}.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + SETTINGS[name]).strip())
    cmd = [sys.executable, "-m", "experiments.bench.xla_cpu_flags", f"--worker_out={self.out}",
           f"--model={FLAGS.model}", f"--batch={FLAGS.batch}",
           f"--image_size={FLAGS.image_size}", f"--check_steps={FLAGS.check_steps}"]
    self.log = open(os.path.join(tmp, f"{name}{tag}.log"), "w+")  # noqa: SIM115
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True)
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      lines = [x for x in self.log.read().splitlines() if x.strip()]
      raise RuntimeError(f"exit {self.proc.returncode}: {(lines or ['?'])[-1][:160]}")
    self.info = json.loads(line)
    with np.load(self.out) as f:
      self.update, self.losses, self.grad_norms = f["update"], f["losses"], f["grad_norms"]

  def ask(self, command: str) -> float:
    """`run N`: seconds for N steps; `peak`: the matmul peak FLOP/s, measured now in the worker."""
    self.proc.stdin.write(f"{command}\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    return self.ask(f"run {steps}") / steps

  def close(self) -> None:
    self.proc.stdin.write("quit\n")
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()


def main(argv) -> None:
  del argv
  if FLAGS.worker_out:
    worker()
    return
  unknown = [s for s in FLAGS.settings if s not in SETTINGS]
  if unknown:
    raise SystemExit(f"unknown setting(s) {','.join(unknown)}; choose from {','.join(SETTINGS)}")
  names = [s for s in FLAGS.settings if s != "default"]
  rows: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as tmp:
    default = Worker("default", tmp)
    steps = max(1, round(FLAGS.round_s / default.info["step_s"]))
    # The default against itself (a second process): the noise floor of the method.
    for name in ["default"] + names:
      try:
        other = Worker(name, tmp, tag="_again" if name == "default" else "")
      except RuntimeError as e:
        rows[name] = {"error": str(e)}
        print(f"# {name}: {e}", file=sys.stderr, flush=True)
        continue
      base, mine = [], []
      for _ in range(FLAGS.rounds):
        base.append(default.time(steps))
        mine.append(other.time(steps))
      other.close()
      rows[name] = {
          "speedup": float(np.median(base) / np.median(mine)), "ms": 1e3 * float(np.median(mine)),
          "default_ms": 1e3 * float(np.median(base)), "compile_s": other.info["compile_s"],
          "nan_ok": other.info["nan_ok"],
          "rel_update_diff": float(np.linalg.norm(other.update - default.update)
                                   / np.linalg.norm(default.update)),
          "loss_diff": float(np.abs(other.losses - default.losses).max()),
          "grad_norm_rel_diff": float(np.abs(other.grad_norms / default.grad_norms - 1).max())}
      print(f"# {name}: {rows[name]}", file=sys.stderr, flush=True)
    peak, flops = default.ask("peak"), default.info["flops"]  # after all the timed rounds
    default.close()
  load = os.getloadavg()[0]
  print(f"XLA:CPU settings, jtl train step: model={FLAGS.model} batch={FLAGS.batch} "
        f"{FLAGS.image_size}x{FLAGS.image_size}x3 float32; {FLAGS.rounds} alternating rounds of "
        f"{steps} steps against a default process; load average {load:.1f}; "
        f"{flops / 1e9:.3f} GFLOP/step (the default's count); matmul peak GFLOP/s {peak / 1e9:.1f}")
  print(f"{'setting':<24}{'ms/step':>9}{'default':>9}{'speed-up':>10}{'of peak':>8}"
        f"{'compile s':>11}{'max|dloss|':>12}{'rel dgnorm':>12}{'rel dupdate':>13}{'NaN ok':>8}"
        "  flags")
  figures: dict = {}
  for name, row in rows.items():
    flag_text = SETTINGS[name] or "(a second default process: the noise floor)"
    if "error" in row:
      print(f"{name:<24}{'failed':>9}  {flag_text}  ({row['error']})")
      figures[name] = None
      continue
    fraction = flops / (row["ms"] / 1e3) / peak  # roofline.fraction, without importing jax here
    print(f"{name:<24}{row['ms']:>9.1f}{row['default_ms']:>9.1f}{row['speedup']:>10.2f}"
          f"{fraction:>8.3f}{row['compile_s']:>11.1f}{row['loss_diff']:>12.1e}"
          f"{row['grad_norm_rel_diff']:>12.1e}{row['rel_update_diff']:>13.1e}"
          f"{str(row['nan_ok']):>8}  {flag_text}")
    figures[name] = round(row["speedup"], 3)
    figures[f"{name}_rel_update_diff"] = float(f"{row['rel_update_diff']:.2e}")
    figures[f"{name}_grad_norm_rel_diff"] = float(f"{row['grad_norm_rel_diff']:.2e}")
    figures[f"{name}_nan_ok"] = row["nan_ok"]
    figures[f"{name}_roofline_fraction"] = round(fraction, 4)
  figures.update(model=FLAGS.model, batch=FLAGS.batch, load_average=round(load, 2),
                 gflops_per_step=round(flops / 1e9, 4), matmul_peak_gflops=round(peak / 1e9, 1))
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
