"""How far a measured step is from the machine's limit: its achieved FLOP/s as a fraction of the
matmul peak measured in the same process (the roofline's compute ceiling, as this backend reaches it).

  peak = matmul_peak()                     # FLOP/s of a large float32 jitted matmul, median of trials
  fraction(step_flops, seconds, peak)      # achieved / peak

The peak is what XLA's own matmul reaches on this device (not a datasheet figure), so a fraction near
1 means the step runs as fast as its FLOPs allow here; far below 1, the time goes elsewhere
(memory-bound ops, convolution kernels slower than matmul, overheads).
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


def fraction(flops: float, seconds: float, peak: float) -> float:
  """Achieved FLOP/s (flops / seconds) as a fraction of `peak`."""
  return flops / seconds / peak
