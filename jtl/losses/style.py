"""Neural style transfer: the losses of Gatys, Ecker & Bethge (2016), "Image Style Transfer Using
Convolutional Neural Networks" (CVPR), Sec. 2, and a total-variation prior.

Conventions (as the other modules of `jtl.losses`): per-example values `[B]`, no reduction, computed in
float32. Feature maps are channels-last `[B, h, w, N]`; in the paper's notation layer l has N_l
filters and M_l = h * w positions, and F^l is the `[N_l, M_l]` matrix of the generated image's
features (P^l: the content image's, A^l: the style image's Gram matrix).

* `gram_matrix`: G^l_ij = sum_k F^l_ik F^l_jk (eq. 3), unnormalised, `[B, N_l, N_l]`.
* `content_loss`: L_content = 1/2 sum_ij (F^l_ij - P^l_ij)^2 (eq. 1), on one layer.
* `style_layer_loss`: E_l = 1 / (4 N_l^2 M_l^2) sum_ij (G^l_ij - A^l_ij)^2 (eq. 4), the paper's
  normalisation, which makes E_l comparable across layers of different size.
* `style_loss`: L_style = sum_l w_l E_l (eq. 5) over the chosen layers.
* `total_variation`: sum over neighbouring pixels of squared differences, sum_ijc (x_{i+1,j,c} -
  x_ijc)^2 + (x_{i,j+1,c} - x_ijc)^2 (the beta = 2 total variation of Mahendran & Vedaldi 2015, a
  smoothness prior often added to eq. 7; not in Gatys et al.).
The total loss of eq. 7, alpha L_content + beta L_style (+ tv_weight * TV), is the objective's
(`jtl.objectives.style`).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def _flat(features: jax.Array) -> jax.Array:
  """`[B, h, w, N]` (or `[B, M, N]`) -> `[B, M, N]` in float32: rows are positions, columns filters."""
  f = features.astype(jnp.float32)
  return f.reshape(f.shape[0], -1, f.shape[-1])


def gram_matrix(features: jax.Array) -> jax.Array:
  """G_ij = sum over positions of F_i F_j: `[B, h, w, N]` -> `[B, N, N]` (eq. 3, unnormalised)."""
  f = _flat(features)
  return jnp.einsum("bmi,bmj->bij", f, f)


def content_loss(features: jax.Array, target_features: jax.Array) -> jax.Array:
  """1/2 sum (F - P)^2 per example (eq. 1); `target_features` broadcasts over the batch."""
  diff = features.astype(jnp.float32) - target_features.astype(jnp.float32)
  return 0.5 * jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def style_layer_loss(features: jax.Array, target_gram: jax.Array) -> jax.Array:
  """E_l = sum (G - A)^2 / (4 N^2 M^2) per example (eq. 4); `target_gram` `[N, N]` or `[B, N, N]`."""
  f = _flat(features)
  positions, filters = f.shape[1], f.shape[2]
  diff = gram_matrix(features) - target_gram.astype(jnp.float32)
  return jnp.sum(jnp.square(diff), axis=(1, 2)) / (4.0 * filters**2 * positions**2)


def style_loss(features: Mapping[str, jax.Array], target_grams: Mapping[str, jax.Array],
               layer_weights: Mapping[str, float]) -> jax.Array:
  """L_style = sum_l w_l E_l over the layers of `layer_weights` (eq. 5), per example."""
  return sum(float(w) * style_layer_loss(features[layer], target_grams[layer])
             for layer, w in layer_weights.items())


def total_variation(images: jax.Array) -> jax.Array:
  """Sum of squared differences between vertically and horizontally adjacent pixels, per example."""
  x = images.astype(jnp.float32)
  down = jnp.square(x[:, 1:, :, :] - x[:, :-1, :, :])
  right = jnp.square(x[:, :, 1:, :] - x[:, :, :-1, :])
  return jnp.sum(down, axis=(1, 2, 3)) + jnp.sum(right, axis=(1, 2, 3))


# --- AdaIN (Huang & Belongie 2017, "Arbitrary Style Transfer in Real-time with Adaptive Instance
# Normalization", ICCV) ----------------------------------------------------------------------------

def channel_moments(features: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """Per-example, per-channel mean and standard deviation over positions: `[B, h, w, N]` ->
  (`[B, N]`, `[B, N]`), sigma = sqrt(variance + eps) (the paper's eqs. 5-6, eps for stability)."""
  f = _flat(features)
  mean = jnp.mean(f, axis=1)
  return mean, jnp.sqrt(jnp.var(f, axis=1) + eps)


def adain(content: jax.Array, style: jax.Array, eps: float = 1e-5) -> jax.Array:
  """AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y) (eq. 8), per example and channel:
  the content features take the style features' channel means and standard deviations."""
  c = content.astype(jnp.float32)
  mu_c, sigma_c = channel_moments(c, eps)
  mu_s, sigma_s = channel_moments(style, eps)
  expand = lambda v: v[:, None, None, :]  # noqa: E731  [B, N] -> [B, 1, 1, N]
  return expand(sigma_s) * (c - expand(mu_c)) / expand(sigma_c) + expand(mu_s)


def moment_loss(features: jax.Array, style_features: jax.Array, eps: float = 1e-5) -> jax.Array:
  """||mu(f) - mu(s)||_2 + ||sigma(f) - sigma(s)||_2 per example (one layer's term of eq. 13)."""
  mu_f, sigma_f = channel_moments(features, eps)
  mu_s, sigma_s = channel_moments(style_features, eps)
  return jnp.linalg.norm(mu_f - mu_s, axis=-1) + jnp.linalg.norm(sigma_f - sigma_s, axis=-1)
