"""Contrastive losses against plain numpy references, analytic values, invariances and 8 devices."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtl.errors import ConfigError
from jtl.losses import contrastive as cl

B, V, D, N = 16, 2, 8, 5  # B divides by the 8 fake devices

# Everything is jitted once per shape (eager dispatch would compile every primitive separately), at
# LLVM -O0: these tests check numbers, not speed, and it cuts each compilation ~3x on 2 CPU cores.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
info_nce = jit(cl.info_nce, static_argnames="normalize")
nt_xent = jit(cl.nt_xent)
supcon = jit(cl.supcon, static_argnames=("form", "base_temperature"))
clip_loss = jit(cl.clip_loss)
siglip_loss = jit(cl.siglip_loss)


def rand(seed, *shape):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ---- plain numpy references (float64, loops where that is clearer) ----------------------------------

def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_logsumexp(x, axis):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_info_nce(a, p, n, t):
  a, p, n = np_normalize(a), np_normalize(p), np_normalize(n)
  out = []
  for i in range(len(a)):
    logits = np.concatenate([[a[i] @ p[i]], n[i] @ a[i]]) / t
    out.append(-(logits[0] - np_logsumexp(logits, 0)))
  return np.array(out)


def np_supcon(views, labels, t, form):
  b, v, d = views.shape
  z = np_normalize(views).reshape(b * v, d)
  groups = np.repeat(labels, v)
  loss, valid = np.zeros(b * v), np.zeros(b * v, bool)
  for i in range(b * v):
    others = [j for j in range(b * v) if j != i]
    log_denominator = np_logsumexp(np.array([z[i] @ z[j] / t for j in others]), 0)
    log_p = np.array([z[i] @ z[j] / t - log_denominator for j in others if groups[j] == groups[i]])
    if len(log_p):
      valid[i] = True
      loss[i] = -log_p.mean() if form == "out" else -np.log(np.mean(np.exp(log_p)))
  return loss.reshape(b, v), valid.reshape(b, v)


def np_nt_xent(views, t):
  return np_supcon(views, np.arange(views.shape[0]), t, "out")[0]


def np_clip(image, text, log_scale):
  logits = math.exp(min(max(log_scale, 0.0), math.log(100))) * np_normalize(image) @ np_normalize(text).T
  i2t = np_logsumexp(logits, 1) - np.diag(logits)
  t2i = np_logsumexp(logits, 0) - np.diag(logits)
  return (i2t + t2i) / 2


def np_siglip(image, text, log_t, b):
  logits = math.exp(log_t) * np_normalize(image) @ np_normalize(text).T + b
  labels = 2 * np.eye(len(logits)) - 1
  return np.sum(np.log1p(np.exp(-labels * logits)), axis=1)


# ---- analytic values --------------------------------------------------------------------------------

def test_constant_similarities_give_analytic_values():
  same = np.ones((B, D), np.float32)  # every similarity is 1: constant logits
  np.testing.assert_allclose(clip_loss(same, same, 2.0), np.full(B, math.log(B)), rtol=1e-5)
  np.testing.assert_allclose(nt_xent(np.ones((B, 2, D)), 0.1), np.full((B, 2), math.log(2 * B - 1)),
                             rtol=1e-5)
  c = 10.0 * 1.0 - 3.0  # exp(log_t) * 1 + b
  softplus = lambda x: math.log1p(math.exp(x))
  np.testing.assert_allclose(siglip_loss(same, same, math.log(10.0), -3.0),
                             np.full(B, softplus(-c) + (B - 1) * softplus(c)), rtol=1e-5)


# ---- against numpy on random embeddings -------------------------------------------------------------

def test_losses_match_numpy_references():
  a, p, n = rand(0, B, D), rand(1, B, D), rand(2, B, N, D)
  np.testing.assert_allclose(info_nce(a, p, n, 0.3), np_info_nce(a, p, n, 0.3), rtol=1e-5)
  views3 = rand(3, 6, 3, D)  # three views: two positives per anchor
  np.testing.assert_allclose(nt_xent(views3, 0.2), np_nt_xent(views3, 0.2), rtol=1e-5)
  labels = np.array([0, 1, 0, 2, 1, 3])  # label 3 is alone: only its other views are positives
  for form in ("out", "in"):
    loss, valid = supcon(views3, labels, 0.2, form)
    ref_loss, ref_valid = np_supcon(views3, labels, 0.2, form)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_array_equal(valid, ref_valid)
  np.testing.assert_allclose(clip_loss(a, p, 1.7), np_clip(a, p, 1.7), rtol=1e-5)
  np.testing.assert_allclose(siglip_loss(a, p, 1.2, -2.0), np_siglip(a, p, 1.2, -2.0), rtol=1e-5)


def test_normalize_false_uses_raw_dot_products():
  a, p, n = 0.3 * rand(0, B, D), 0.3 * rand(1, B, D), 0.3 * rand(2, B, N, D)
  logits = np.concatenate([np.sum(a * p, -1, keepdims=True), np.einsum("bd,bnd->bn", a, n)], 1) / 0.5
  expected = np_logsumexp(logits.astype(np.float64), 1) - logits[:, 0]
  np.testing.assert_allclose(info_nce(a, p, n, 0.5, normalize=False), expected, rtol=1e-5)


# ---- SupCon -----------------------------------------------------------------------------------------

def test_supcon_with_unique_labels_is_nt_xent():
  views = rand(4, B, 2, D)
  loss, valid = supcon(views, np.arange(B) * 7, 0.1)
  assert bool(np.all(valid))
  np.testing.assert_allclose(loss, nt_xent(views, 0.1), rtol=1e-6)


def test_supcon_forms_agree_with_one_positive_and_differ_with_more():
  views = rand(5, B, 1, D)
  pairs = np.repeat(np.arange(B // 2), 2)  # one view: every anchor has exactly one positive
  out_loss, _ = supcon(views, pairs, 0.1, "out")
  in_loss, _ = supcon(views, pairs, 0.1, "in")
  np.testing.assert_allclose(out_loss, in_loss, rtol=1e-6)
  triples = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5])
  # Jensen: -mean(log p) >= -log(mean p), strictly unless all positives have equal p.
  out_loss, _ = supcon(views, triples, 0.1, "out")
  in_loss, _ = supcon(views, triples, 0.1, "in")
  assert np.all(np.asarray(out_loss[:12]) > np.asarray(in_loss[:12]) + 1e-4)
  np.testing.assert_allclose(out_loss[12:], in_loss[12:], rtol=1e-6)


def test_supcon_anchor_without_positive_is_zero_invalid_and_finite():
  views = rand(6, B, 1, D)
  labels = np.array([0, 0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8])  # anchors 2 and 3 are alone
  expected_valid = np.ones(B, bool)
  expected_valid[[2, 3]] = False

  def mean_losses(views, temperature):
    out_loss, out_valid = cl.supcon(views, labels, temperature, "out")
    in_loss, in_valid = cl.supcon(views, labels, temperature, "in")
    means = (cl.masked_mean(out_loss, out_valid), cl.masked_mean(in_loss, in_valid))
    return sum(means), (means, out_loss, in_loss, out_valid, in_valid)

  grad_fn = jit(jax.value_and_grad(mean_losses, argnums=(0, 1), has_aux=True))
  (_, (means, *losses, out_valid, in_valid)), grads = grad_fn(views, 0.005)
  for mean, loss, valid in zip(means, losses, (out_valid, in_valid)):
    np.testing.assert_array_equal(valid[:, 0], expected_valid)
    np.testing.assert_array_equal(loss[~expected_valid], 0.0)
    assert np.all(np.asarray(loss[expected_valid]) > 0)
    np.testing.assert_allclose(mean, np.mean(loss[expected_valid]), rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)
  # With no valid anchor at all the mean is 0, not NaN.
  for form in ("out", "in"):
    assert float(cl.masked_mean(*supcon(views, np.arange(B), 0.1, form))) == 0.0


def test_supcon_base_temperature_scales_by_t_over_base():
  views, labels = rand(7, B, 2, D), np.arange(B) % 5
  plain, _ = supcon(views, labels, 0.1)
  scaled, _ = supcon(views, labels, 0.1, base_temperature=0.07)
  np.testing.assert_allclose(scaled, plain * (0.1 / 0.07), rtol=1e-6)


# ---- invariances and numerics ------------------------------------------------------------------------

def all_mean_losses(floats, labels):
  """Every loss reduced to its mean, each with its own inputs, so the gradient of the sum w.r.t. a
  loss's inputs is that loss's gradient (one compilation covers all losses)."""
  f = floats
  supcon_out, valid_out = cl.supcon(f["views"][0], labels, f["t"][0], "out")
  supcon_in, valid_in = cl.supcon(f["views"][1], labels, f["t"][1], "in")
  means = {
      "info_nce": jnp.mean(cl.info_nce(f["x"][0], f["y"][0], f["negatives"], f["t"][2])),
      "nt_xent": jnp.mean(cl.nt_xent(f["views"][2], f["t"][3])),
      "supcon_out": cl.masked_mean(supcon_out, valid_out),
      "supcon_in": cl.masked_mean(supcon_in, valid_in),
      "clip": jnp.mean(cl.clip_loss(f["x"][1], f["y"][1], f["log_scale"])),
      "siglip": jnp.mean(cl.siglip_loss(f["x"][2], f["y"][2], f["log_t"], f["bias"])),
  }
  return sum(means.values()), means


all_means_and_grads = jit(jax.value_and_grad(all_mean_losses, has_aux=True))


def loss_inputs(seed=0, temperature=0.1, log_scale=2.0, log_t=math.log(10.0)):
  floats = dict(x=rand(seed + 1, 3, B, D), y=rand(seed + 2, 3, B, D),
                views=rand(seed + 3, 3, B, V, D), negatives=rand(seed + 4, B, N, D),
                t=np.full(4, temperature, np.float32), log_scale=np.float32(log_scale),
                log_t=np.float32(log_t), bias=np.float32(-10.0))
  return floats, np.random.RandomState(seed).randint(0, 5, B)


def test_permuting_the_batch_leaves_every_mean_unchanged():
  floats, labels = loss_inputs(seed=10)
  perm = np.random.RandomState(0).permutation(B)
  permuted = dict(floats, x=floats["x"][:, perm], y=floats["y"][:, perm],
                  views=floats["views"][:, perm], negatives=floats["negatives"][perm])
  (_, means), _ = all_means_and_grads(floats, labels)
  (_, permuted_means), _ = all_means_and_grads(permuted, labels[perm])
  for name in means:
    np.testing.assert_allclose(permuted_means[name], means[name], rtol=1e-5, err_msg=name)
  # Permuting only the labels is not a symmetry: the check above can tell.
  (_, shuffled_labels), _ = all_means_and_grads(floats, labels[perm])
  assert abs(float(shuffled_labels["supcon_out"]) - float(means["supcon_out"])) > 1e-3


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.005), -3.0, 4.0])
def test_finite_values_and_gradients_at_low_temperature_and_clip_clamp(log_scale):
  floats, labels = loss_inputs(seed=20, temperature=0.005, log_scale=log_scale,
                               log_t=math.log(1 / 0.005))
  floats["views"][:, :4] = floats["views"][:, :1]  # exact duplicates: similarity 1 across examples
  (_, means), grads = all_means_and_grads(floats, labels)
  for name, value in means.items():
    assert np.isfinite(value), name
  for name, grad in grads.items():
    assert np.all(np.isfinite(grad)), name
  expected_clip = np.mean(np_clip(floats["x"][1], floats["y"][1], log_scale))
  np.testing.assert_allclose(means["clip"], expected_clip, rtol=1e-4)
  # Outside [0, log 100] the scale is clamped (100 or 1) and log_scale gets no gradient (jnp.clip).
  inside = 0.0 < log_scale < math.log(100.0)
  assert (float(grads["log_scale"]) != 0.0) == inside


# ---- 8 devices: global-batch losses under jit, and the chunked SigLIP --------------------------------

def test_sharded_mean_losses_and_gradients_match_one_device():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  floats, labels = loss_inputs(seed=30)
  batch_axis = {"x": 1, "y": 1, "views": 1, "negatives": 0}

  def place(name, value):
    spec = [None] * np.ndim(value)
    if name in batch_axis:
      spec[batch_axis[name]] = "data"
    return jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))

  sharded = {name: place(name, value) for name, value in floats.items()}
  sharded_labels = jax.device_put(labels, NamedSharding(mesh, PartitionSpec("data")))
  assert sharded["views"].sharding.shard_shape(sharded["views"].shape)[1] == B // 8
  (_, means), grads = all_means_and_grads(floats, labels)
  (_, sharded_means), sharded_grads = all_means_and_grads(sharded, sharded_labels)
  assert len(sharded_grads["views"].sharding.device_set) == 8
  for name in means:
    np.testing.assert_allclose(sharded_means[name], means[name], rtol=1e-5, err_msg=name)
  for name in grads:
    np.testing.assert_allclose(sharded_grads[name], grads[name], rtol=1e-5, atol=1e-6, err_msg=name)


def siglip_chunked_mean(image, text, log_t, bias, mesh):
  per_row = cl.siglip_loss_chunked(image, text, log_t, bias, mesh=mesh)
  return jnp.mean(per_row), per_row


siglip_chunked_mean_and_grads = jit(
    jax.value_and_grad(siglip_chunked_mean, argnums=(0, 1, 2, 3), has_aux=True),
    static_argnames="mesh")


@pytest.mark.parametrize("num_devices", [8, 1])
def test_chunked_siglip_matches_unchunked(num_devices):
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  floats, labels = loss_inputs(seed=40)
  # The unchunked reference: SigLIP's part of all_mean_losses (inputs x[2], y[2], log_t, bias).
  (_, means), grads = all_means_and_grads(floats, labels)
  image, text, log_t, bias = floats["x"][2], floats["y"][2], floats["log_t"], floats["bias"]
  data = NamedSharding(mesh, PartitionSpec("data"))
  (value, per_row), chunked_grads = siglip_chunked_mean_and_grads(
      jax.device_put(image, data), jax.device_put(text, data), log_t, bias, mesh=mesh)
  np.testing.assert_allclose(per_row, np_siglip(image, text, log_t, bias), rtol=1e-5)
  np.testing.assert_allclose(value, means["siglip"], rtol=1e-5)
  expected_grads = (grads["x"][2], grads["y"][2], grads["log_t"], grads["bias"])
  for grad, chunked_grad in zip(expected_grads, chunked_grads):
    np.testing.assert_allclose(chunked_grad, grad, rtol=1e-5, atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------------------

def test_bad_input_raises_config_error():
  views = rand(0, 4, 2, D)
  with pytest.raises(ConfigError, match="form"):
    cl.supcon(views, np.arange(4), 0.1, form="mean")
  with pytest.raises(ConfigError, match="2 views"):
    cl.nt_xent(views[:, :1], 0.1)
  with pytest.raises(ConfigError, match="temperature"):
    cl.nt_xent(views, 0.0)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  with pytest.raises(ConfigError, match="divisible"):
    cl.siglip_loss_chunked(rand(0, 12, D), rand(1, 12, D), 0.0, 0.0, mesh=mesh)
  with pytest.raises(ConfigError, match="axes"):
    cl.siglip_loss_chunked(rand(0, 8, D), rand(1, 8, D), 0.0, 0.0, mesh=mesh, axis="batch")
