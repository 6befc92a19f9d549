"""The roofline helper: a measured matmul peak and the fraction arithmetic."""
import jax
import jax.numpy as jnp

from experiments.bench import roofline


def test_fraction_is_achieved_flops_per_second_over_peak():
  assert roofline.fraction(flops=6e9, seconds=2.0, peak=1e10) == 0.3


def test_peak_is_positive_and_xla_counts_a_matmul_as_2n_cubed_flops():
  peak = roofline.matmul_peak(n=256, trials=3)
  assert peak > 0
  n = 256
  flops = jax.jit(jnp.matmul).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile().cost_analysis()
  assert flops["flops"] == 2 * n ** 3  # what the benchmarks' fractions divide by
