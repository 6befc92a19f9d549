"""The roofline helper: a measured matmul peak, XLA's FLOP count and the fraction arithmetic."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.bench import roofline


def test_fraction_is_achieved_flops_per_second_over_peak():
  assert roofline.fraction(flops=6e9, seconds=2.0, peak=1e10) == 0.3


def test_peak_is_positive_and_xla_counts_a_matmul_as_2n_cubed_flops():
  peak = roofline.matmul_peak(n=256, trials=3)
  assert peak > 0
  n = 256
  flops = jax.jit(jnp.matmul).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile().cost_analysis()
  assert flops["flops"] == 2 * n ** 3  # what the benchmarks' fractions divide by


def test_compiled_flops_of_a_matmul_jitted_or_compiled():
  m, k, n = 64, 32, 16
  args = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
  jitted = jax.jit(jnp.matmul)
  assert roofline.compiled_flops(jitted, *args) == 2 * m * k * n
  assert roofline.compiled_flops(jitted.lower(*args).compile()) == 2 * m * k * n


def test_compiled_flops_takes_a_cost_analysis_list():
  class Compiled:  # older jax: cost_analysis() is a list, one dict per program
    def cost_analysis(self):
      return [{"flops": 12.0}]
  assert roofline.compiled_flops(Compiled()) == 12.0


def test_xla_counts_a_loop_body_once():
  """What memory.py (gradient accumulation) and contrastive.py (the ring's scan) correct for."""
  n = 32
  w = jax.ShapeDtypeStruct((n, n), jnp.float32)
  scan = jax.jit(lambda x, w: jax.lax.scan(lambda x, _: (x @ w, None), x, None, length=4)[0])
  flops = roofline.compiled_flops(scan, w, w)
  assert 2 * n ** 3 <= flops < 2 * 2 * n ** 3  # one matmul (and the loop counter), not 4


def test_xla_counts_a_sharded_program_per_device():
  """What contrastive.py (embeddings sharded over the fake CPU devices) multiplies back."""
  devices = jax.devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))
  m, n = 8 * len(devices), 32
  x = jax.ShapeDtypeStruct((m, n), jnp.float32, sharding=sharding)
  w = jax.ShapeDtypeStruct((n, n), jnp.float32)
  assert roofline.compiled_flops(jax.jit(jnp.matmul), x, w) == 2 * m * n * n / len(devices)


def test_columns_are_gflop_per_step_gflop_per_s_and_fraction():
  row = roofline.columns(flops=2e9, seconds=0.5, peak=8e9)
  assert row.split() == ["2.000", "4.0", "0.500"]
  assert len(row) == len(roofline.HEADER)
