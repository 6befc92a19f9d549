"""How far a measured step is from the machine's limit: its achieved FLOP/s as a fraction of the
matmul peak measured in the same process (the roofline's compute ceiling, as this backend reaches it).

  peak = matmul_peak()                   # FLOP/s of a large float32 jitted matmul, median of trials
  flops = compiled_flops(step, *args)    # XLA's FLOP count (cost analysis) of one call
  fraction(flops, seconds, peak)         # achieved / peak
  HEADER, columns(flops, seconds, peak)  # a table's columns: GFLOP/step, GFLOP/s, fraction of peak

The peak is what XLA's own matmul reaches on this device (not a datasheet figure), so a fraction near
1 means the step runs as fast as its FLOPs allow here; far below 1, the time goes elsewhere
(memory-bound ops, convolution kernels slower than matmul, overheads).

Two properties of XLA's FLOP count the benchmarks account for: a sharded program's count is per
device, and a loop (`lax.scan`, `fori_loop`, `while_loop`) body is counted once, whatever its trip
count (tests/test_bench_roofline.py pins both).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, trials: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of an [n, n] @ [n, n] jitted matmul on the default device (median of `trials`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(trials):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 / float(np.median(times))


def compiled_flops(fn, *args) -> float:
  """XLA's FLOP count of one call: `fn` jitted (lowered and compiled for `args`, arrays or
  jax.ShapeDtypeStructs; jit's cache makes this free after a call with the same arguments) or
  already compiled (no `args`)."""
  compiled = fn.lower(*args).compile() if hasattr(fn, "lower") else fn
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["flops"])


def fraction(flops: float, seconds: float, peak: float) -> float:
  """Achieved FLOP/s (flops / seconds) as a fraction of `peak`."""
  return flops / seconds / peak


HEADER = f"{'GFLOP/step':>11}{'GFLOP/s':>9}{'of peak':>8}"


def columns(flops: float, seconds: float, peak: float) -> str:
  """The roofline columns of a table row, under HEADER: GFLOPs per step, achieved GFLOP/s, and
  their fraction of `peak`."""
  return f"{flops / 1e9:>11.3f}{flops / seconds / 1e9:>9.1f}{fraction(flops, seconds, peak):>8.3f}"
