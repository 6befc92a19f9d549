"""Mixed precision, gradient accumulation, rematerialisation, compilation cache: correctness only."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl import compile_cache, data, train
from jtl.errors import ConfigError
from jtl.sharding import to_global
from tests.helpers import digits_config


def steps(config, n=3, batch_size=None):
  """Params and per-step losses of n steps on the first batches of the config's data."""
  batches = data.train_iterator(config.data, global_batch_size=batch_size or config.batch_size,
                                seed=0)
  batch = next(batches)
  s = train.setup(config, batch)
  state = train.initial_state(s, *train.fresh_variables(s))
  step = train.make_train_step(s)
  losses = []
  for _ in range(n):
    state, metrics = step(state, to_global(batch, s.batch_sharding))
    losses.append(float(metrics["loss"]))
  return s, jax.device_get(state), losses


def test_bfloat16_computes_in_bf16_and_keeps_f32_params_and_optimizer_state_close_to_f32():
  f32 = digits_config(mesh__axes=(("data", 1),))
  bf16 = digits_config(mesh__axes=(("data", 1),), precision="bfloat16")
  s32, state32, losses32 = steps(f32)
  s, state16, losses16 = steps(bf16)
  assert s.objective.model.backbone.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state16.params, state16.opt_state))
             if jnp.issubdtype(x.dtype, jnp.floating))

  # The step's convolutions and matmuls take bf16 operands (both convs, forward and backward), and
  # none do in the float32 run.
  def bf16_ops(s):
    text = train.make_train_step(s).lower(s.abstract_state, s.abstract_batch).as_text()
    return len(re.findall(r"stablehlo\.(?:convolution|dot_general)\b.*bf16", text))
  assert bf16_ops(s32) == 0 and bf16_ops(s) >= 4
  # Stated tolerance: bf16 has an 8-bit mantissa (relative rounding ~4e-3): the losses agree to 2%;
  # the parameters, measured against how far training moved them (3 steps from a zero head move
  # them by 4.5e-3 at most, 0.08 in norm), end within half that distance of the float32 run's
  # (measured: 0.26 of it; most of it Adam's first steps on gradients near zero, whose sign
  # rounding decides).
  np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
  start = flat(jax.device_get(train.fresh_variables(s32)[0]))
  moved = np.linalg.norm(flat(state32.params) - start)
  assert moved > 0.01
  assert np.linalg.norm(flat(state16.params) - flat(state32.params)) < 0.5 * moved
  with pytest.raises(ConfigError, match="precision"):
    steps(digits_config(precision="float16"))


def test_gradient_accumulation_equals_one_large_batch_without_batchnorm():
  def config(accum):
    c = digits_config(mesh__axes=(("data", 8),), grad_accum_steps=accum, batch_size=64)
    c.model = type(c.model)(dict(name="mlp", num_classes=5, hidden=(32,)))
    return c
  _, one, losses_one = steps(config(1))
  _, four, losses_four = steps(config(4))
  np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="grad_accum_steps=3"):
    steps(config(3))


def temp_bytes(config):
  batches = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  s = train.setup(config, next(batches))
  compiled = train.make_train_step(s).lower(s.abstract_state, s.abstract_batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_gradient_accumulation_keeps_activation_memory_of_one_micro_batch():
  small = temp_bytes(digits_config(mesh__axes=(("data", 1),), batch_size=64, model__widths=(32, 64)))
  large = temp_bytes(digits_config(mesh__axes=(("data", 1),), batch_size=256, model__widths=(32, 64)))
  accumulated = temp_bytes(digits_config(mesh__axes=(("data", 1),), batch_size=256,
                                         grad_accum_steps=4, model__widths=(32, 64)))
  assert large > 2.5 * small
  assert accumulated < 1.5 * small, (small, large, accumulated)


@pytest.mark.parametrize("model", [dict(name="resnet_small", widths=None, stage_sizes=(1, 1), width=8),
                                   dict(name="vit", widths=None, patch_size=2, width=16, depth=2,
                                        num_heads=2, mlp_dim=32),
                                   dict(name="cnn_small", widths=(8, 16))])
def test_rematerialisation_is_in_the_step_and_gives_the_same_training(model):
  """Both blocks are rematerialised in the lowered step (JAX lowers `remat` to an
  optimization_barrier, which keeps XLA from reusing the forward activations), and the training is
  that of the plain model."""
  overrides = {f"model__{k}": v for k, v in model.items()}
  s_plain, plain, plain_losses = steps(digits_config(mesh__axes=(("data", 1),), **overrides), n=2)
  s_remat, remat, remat_losses = steps(digits_config(mesh__axes=(("data", 1),), model__remat=True,
                                                     **overrides), n=2)

  def barriers(s):
    lowered = train.make_train_step(s).lower(s.abstract_state, s.abstract_batch)
    return lowered.as_text().count("optimization_barrier")
  assert barriers(s_plain) == 0
  assert barriers(s_remat) >= 2  # one per rematerialised block (two in each model here)
  np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((remat.params, remat.model_state)),
                  jax.tree.leaves((plain.params, plain.model_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compilation_cache_is_written_then_reused(tmp_path):
  cache = compile_cache.enable(str(tmp_path / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # this one compiles fast
  try:
    def f(x):
      return jnp.sin(x) @ jnp.cos(x).T + jnp.tanh(x).sum()
    x = jnp.ones((64, 64))
    events = []
    listener = lambda event, **kwargs: events.append(event)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
      jax.jit(f).lower(x).compile()
      entries = set((tmp_path / "xla").iterdir())
      assert entries
      assert events.count("/jax/compilation_cache/cache_misses") == 1
      assert "/jax/compilation_cache/cache_hits" not in events
      jax.clear_caches()  # forget the in-memory executable: the next compile must come from disk
      events.clear()
      jax.jit(f).lower(x).compile()
      # JAX's own event: the executable was read from the cache (a miss would recompile and write
      # the same entry again, leaving the directory as it was).
      assert events.count("/jax/compilation_cache/cache_hits") == 1, events
      assert "/jax/compilation_cache/cache_misses" not in events
      assert set((tmp_path / "xla").iterdir()) == entries
    finally:
      jax.monitoring.unregister_event_listener(listener)
  finally:
    compile_cache.enable()  # back to the session's cache (and its threshold)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  assert cache == str(tmp_path / "xla")
