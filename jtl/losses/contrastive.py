"""Contrastive losses over embeddings: InfoNCE, NT-Xent, SupCon, CLIP, SigLIP and chunked SigLIP.

Conventions
- Inputs are embeddings (any float dtype); everything is computed in float32. Unless
  `normalize=False`, embeddings are L2-normalised inside, so dot products are cosine similarities.
- No reduction: each loss returns one value per anchor (or per example / image row). SupCon also
  returns a `valid` mask (anchors that have at least one positive); reduce it with `masked_mean`, i.e.
  average over valid anchors only.
- Global batch, no pmap: jtl runs one `jax.jit` step over a Mesh with the batch sharded along "data".
  These functions see the global arrays, XLA inserts the all-gathers, and gradients through an
  all-gather are exact (its transpose is a reduce-scatter), so negatives come from every device and
  need no hand-written gradient correction. The price is a [B_global, B_global] similarity matrix;
  `siglip_loss_chunked` is the one loss that avoids it (a ring over devices with `ppermute`).
- Numerics: log-softmax / logsumexp / log-sigmoid only, never a naive exp. Excluded entries (an
  anchor's similarity with itself) get a large *finite* negative logit instead of -inf, so an anchor
  with nothing to compare against never produces inf - inf = NaN, in the value or in the gradient.
  Values and gradients stay finite at temperature 0.005.

References
- InfoNCE: van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding", eq. 4.
- NT-Xent: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"
  (SimCLR), eq. 1; with V > 2 views the positives are averaged as in SupCon's eq. 2.
- SupCon: Khosla et al. 2020, "Supervised Contrastive Learning", eq. 2 (L_out) and eq. 3 (L_in).
- CLIP: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
  Figure 3 (symmetric cross-entropy, learnable logit scale clamped at 100).
- SigLIP: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Algorithm 1 and Sec. 3.3
  (the chunked implementation).
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jtl.errors import ConfigError

# A logit that vanishes under exp() next to any real logit but keeps all arithmetic finite.
_EXCLUDED_LOGIT = -1e30
# CLIP clamps its logit scale to [1, 100], i.e. the log scale to [0, log 100].
CLIP_MAX_LOG_SCALE = math.log(100.0)

ArrayLike = jax.Array | float


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`: finite value and gradient for an all-zero vector."""
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` over entries where `valid` is True (0 if none is valid, never NaN)."""
  valid = valid.astype(jnp.float32)
  return jnp.sum(values * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _embeddings(x: jax.Array, normalize: bool) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return l2_normalize(x) if normalize else x


def _check_positive(value: ArrayLike | None, name: str) -> None:
  # Only Python numbers can be checked here; a traced (learnable) value is the caller's business.
  if isinstance(value, (int, float)) and not value > 0:
    raise ConfigError(f"{name} must be > 0, got {value}; use a positive value such as 0.1")


def _check_rank(x: jax.Array, rank: int, name: str, layout: str) -> None:
  if jnp.ndim(x) != rank:
    raise ConfigError(f"{name} must have shape {layout}, got shape {jnp.shape(x)}; reshape it")


def info_nce(anchor: jax.Array, positive: jax.Array, negatives: jax.Array,
             temperature: ArrayLike = 1.0, *, normalize: bool = True) -> jax.Array:
  """InfoNCE per anchor [B]: -log e^{a.p/t} / (e^{a.p/t} + sum_n e^{a.n_n/t}).

  anchor, positive: [B, D]; negatives: [B, N, D] (each anchor has its own N negatives).
  """
  _check_rank(anchor, 2, "anchor", "[B, D]")
  _check_rank(negatives, 3, "negatives", "[B, N, D]")
  _check_positive(temperature, "temperature")
  anchor, positive, negatives = (_embeddings(x, normalize) for x in (anchor, positive, negatives))
  positive_logit = jnp.sum(anchor * positive, axis=-1, keepdims=True) / temperature
  negative_logits = jnp.einsum("bd,bnd->bn", anchor, negatives) / temperature
  logits = jnp.concatenate([positive_logit, negative_logits], axis=1)
  return -jax.nn.log_softmax(logits, axis=1)[:, 0]


def _multi_positive_loss(embeddings: jax.Array, groups: jax.Array, temperature: ArrayLike,
                         form: str) -> tuple[jax.Array, jax.Array]:
  """Shared core of NT-Xent and SupCon over M anchors [M, D] with group ids [M].

  Every embedding is an anchor; its positives are the *other* embeddings of its group, every other
  embedding is a negative, and itself is excluded from the softmax denominator.
  """
  num = embeddings.shape[0]
  is_self = jnp.eye(num, dtype=bool)
  logits = embeddings @ embeddings.T / temperature
  logits = jnp.where(is_self, _EXCLUDED_LOGIT, logits)
  log_prob = jax.nn.log_softmax(logits, axis=1)
  is_positive = (groups[:, None] == groups[None, :]) & ~is_self
  num_positives = jnp.sum(is_positive, axis=1)
  valid = num_positives > 0
  safe_count = jnp.maximum(num_positives, 1).astype(jnp.float32)
  if form == "out":  # eq. 2: average of -log p over the positives
    loss = -jnp.sum(jnp.where(is_positive, log_prob, 0.0), axis=1) / safe_count
  else:  # eq. 3: -log of the average p over the positives
    positive_log_prob = jnp.where(is_positive, log_prob, _EXCLUDED_LOGIT)
    loss = -(jax.nn.logsumexp(positive_log_prob, axis=1) - jnp.log(safe_count))
  # The where() also zeroes the cotangent of the (huge, meaningless) invalid branch.
  return jnp.where(valid, loss, 0.0), valid


def nt_xent(views: jax.Array, temperature: ArrayLike, *, normalize: bool = True) -> jax.Array:
  """NT-Xent (SimCLR) per anchor [B, V] for `views` [B, V, D] (V >= 2 augmented views per example).

  Each of the B*V embeddings is an anchor; the other V-1 views of its example are its positives and
  the remaining B*V - V embeddings its negatives; itself is left out of the denominator. With V > 2
  the loss averages -log p over the V-1 positives; with V = 2 it is exactly SimCLR's eq. 1.
  """
  _check_rank(views, 3, "views", "[B, V, D]")
  batch, num_views, dim = views.shape
  if num_views < 2:
    raise ConfigError(f"nt_xent needs at least 2 views per example, got views of shape {views.shape};"
                      " stack two or more augmentations along axis 1")
  _check_positive(temperature, "temperature")
  embeddings = _embeddings(views, normalize).reshape(batch * num_views, dim)
  example_ids = jnp.repeat(jnp.arange(batch), num_views)
  loss, _ = _multi_positive_loss(embeddings, example_ids, temperature, "out")
  return loss.reshape(batch, num_views)


def supcon(views: jax.Array, labels: jax.Array, temperature: ArrayLike,
           form: Literal["out", "in"] = "out", *, base_temperature: float | None = None,
           normalize: bool = True) -> tuple[jax.Array, jax.Array]:
  """Supervised contrastive loss per anchor: `(loss [B, V], valid [B, V])`.

  views: [B, V, D] (V >= 1), labels: [B] integer classes. Positives of an anchor are all *other*
  embeddings with its label, its own other views included. `form="out"` is eq. 2 of Khosla et al.
  (-(1/|P|) sum_p log softmax_p, the one the paper recommends); `form="in"` is eq. 3
  (-log((1/|P|) sum_p softmax_p)). An anchor with no positive gets loss 0 and `valid=False`
  (finite gradients): reduce with `masked_mean(loss, valid)`, the mean over valid anchors.
  `base_temperature`, as in the authors' reference code, multiplies the loss by
  `temperature / base_temperature`; the default (None) leaves it unscaled.
  """
  _check_rank(views, 3, "views", "[B, V, D]")
  if form not in ("out", "in"):
    raise ConfigError(f"supcon form must be 'out' (eq. 2) or 'in' (eq. 3), got {form!r}")
  _check_positive(temperature, "temperature")
  _check_positive(base_temperature, "base_temperature")
  batch, num_views, dim = views.shape
  if jnp.shape(labels) != (batch,):
    raise ConfigError(f"supcon labels must have shape [B] = ({batch},), got {jnp.shape(labels)}")
  embeddings = _embeddings(views, normalize).reshape(batch * num_views, dim)
  loss, valid = _multi_positive_loss(embeddings, jnp.repeat(labels, num_views), temperature, form)
  if base_temperature is not None:
    loss = loss * (temperature / base_temperature)
  return loss.reshape(batch, num_views), valid.reshape(batch, num_views)


def clip_loss(image: jax.Array, text: jax.Array, log_scale: ArrayLike, *,
              normalize: bool = True) -> jax.Array:
  """CLIP's symmetric cross-entropy per pair [B]: mean of the image->text and text->image CE.

  logits = exp(clip(log_scale, 0, log 100)) * cos(image_i, text_j); pair i is the right answer for
  row i and column i. The clamp is a plain `jnp.clip`, not a straight-through estimator: outside
  [0, log 100] the gradient w.r.t. `log_scale` is zero, so a scale pushed past 100 stays there
  (CLIP instead clips the parameter after each update; do that in the objective if wanted).
  """
  _check_rank(image, 2, "image", "[B, D]")
  _check_rank(text, 2, "text", "[B, D]")
  image, text = _embeddings(image, normalize), _embeddings(text, normalize)
  scale = jnp.exp(jnp.clip(jnp.asarray(log_scale, jnp.float32), 0.0, CLIP_MAX_LOG_SCALE))
  logits = scale * (image @ text.T)
  image_to_text = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
  text_to_image = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
  return 0.5 * (image_to_text + text_to_image)


def _siglip_rows(image: jax.Array, text: jax.Array, log_t: jax.Array, b: jax.Array,
                 positive_diagonal: bool) -> jax.Array:
  """Per image row, sum_j -log sigmoid(label_ij * (e^{log_t} x_i.y_j + b)) over one block of texts."""
  logits = jnp.exp(log_t) * (image @ text.T) + b
  if positive_diagonal:
    labels = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=jnp.float32) - 1.0
  else:  # blocks away from the diagonal hold only negative pairs
    labels = -1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1)


def siglip_loss(image: jax.Array, text: jax.Array, log_t: ArrayLike, b: ArrayLike, *,
                normalize: bool = True) -> jax.Array:
  """SigLIP per image row [B]: sum_j -log_sigmoid(z_ij (e^{log_t} x_i.y_j + b)), z = +1 iff i = j.

  The paper's loss, (1/|B|) sum_i sum_j, is the mean of this. Paper init: log_t = log 10, b = -10.
  """
  _check_rank(image, 2, "image", "[B, D]")
  _check_rank(text, 2, "text", "[B, D]")
  image, text = _embeddings(image, normalize), _embeddings(text, normalize)
  return _siglip_rows(image, text, jnp.asarray(log_t, jnp.float32), jnp.asarray(b, jnp.float32),
                      positive_diagonal=True)


def siglip_loss_chunked(image: jax.Array, text: jax.Array, log_t: ArrayLike, b: ArrayLike, *,
                        mesh: Mesh, axis: str = "data", normalize: bool = True) -> jax.Array:
  """`siglip_loss` (same values and gradients) with O(B_local^2) memory per device instead of
  O(B_local * B_global).

  Under `jax.shard_map` over `axis`, each of the n devices keeps its B_local image rows and its text
  block; the text blocks travel round a ring (`lax.ppermute`, n-1 hops), and each hop adds one
  B_local x B_local block (all negatives: only the first, local block has the positive diagonal) to
  the per-row sums. Each block is rematerialised in the backward pass (`jax.checkpoint`), so no
  [B_local, B_global] matrix is ever stored; gradients are plain autodiff through ppermute (whose
  transpose is the reverse ppermute: exact). Returns the global [B] per-row losses sharded along
  `axis`. B must divide by the size of `axis`; a mesh of size 1 is one local block.
  """
  _check_rank(image, 2, "image", "[B, D]")
  _check_rank(text, 2, "text", "[B, D]")
  if axis not in mesh.axis_names:
    raise ConfigError(f"siglip_loss_chunked: mesh has axes {mesh.axis_names}, not {axis!r}; pass"
                      " axis= one of them")
  num_devices = mesh.shape[axis]
  if image.shape != text.shape or image.shape[0] % num_devices:
    raise ConfigError(f"siglip_loss_chunked needs image and text of equal shape [B, D] with B "
                      f"divisible by the {num_devices} devices of axis {axis!r}; got {image.shape} "
                      f"and {text.shape}")
  image, text = _embeddings(image, normalize), _embeddings(text, normalize)
  ring = [(i, (i + 1) % num_devices) for i in range(num_devices)]
  local_block = jax.checkpoint(functools.partial(_siglip_rows, positive_diagonal=True))
  remote_block = jax.checkpoint(functools.partial(_siglip_rows, positive_diagonal=False))

  def per_device(image_local, text_local, log_t, b):
    row_loss = local_block(image_local, text_local, log_t, b)
    if num_devices == 1:
      return row_loss

    def hop(carry, _):
      text_visiting, row_loss = carry
      text_visiting = jax.lax.ppermute(text_visiting, axis, ring)
      return (text_visiting, row_loss + remote_block(image_local, text_visiting, log_t, b)), None

    # A scan (not an unrolled loop) keeps one block live at a time and the program size fixed in n.
    (_, row_loss), _ = jax.lax.scan(hop, (text_local, row_loss), length=num_devices - 1)
    return row_loss

  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(PartitionSpec(axis), PartitionSpec(axis), PartitionSpec(),
                                    PartitionSpec()),
                          out_specs=PartitionSpec(axis))
  return sharded(image, text, jnp.asarray(log_t, jnp.float32), jnp.asarray(b, jnp.float32))
