"""Representation probes: kNN, closed-form ridge (linear) probe, zero-shot and retrieval recall.

Pure functions over feature arrays (no models, no data pipelines), for representation evaluators.
Conventions:
- Similarities are cosine: features are L2-normalised inside (kNN, zero-shot, retrieval).
- Arithmetic is float32; matrix products that decide a prediction use `Precision.HIGHEST`, so
  accelerators do not silently drop to bf16/TF32 passes.
- Predictions are int32 class indices; ties go to the lowest class index (`argmax`).
- The heavy parts are jitted with static shapes; kNN walks the queries in fixed-size chunks
  (`lax.map`), so memory is O(chunk_size * N_train) whatever the number of queries.

References: kNN with exp(sim / T)-weighted votes, Wu et al. 2018 ("Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", Sec. 3.4) as used by DINO (Caron et al. 2021); zero-shot
with prompt ensembling, Radford et al. 2021 (CLIP, Sec. 3.1.4).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import ConfigError
from jtl.losses.contrastive import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_features(x: jax.Array, name: str, rank: int = 2, layout: str = "[N, D]") -> None:
  if jnp.ndim(x) != rank:
    raise ConfigError(f"{name} must have shape {layout}, got shape {jnp.shape(x)}; reshape it")


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def _knn_chunks(train_feats, train_labels, query_chunks, temperature, *, num_classes, k, chunk_size):
  del chunk_size  # part of the shape of query_chunks; static so each chunk size compiles once
  train_feats = l2_normalize(train_feats.astype(jnp.float32))

  def classify_chunk(queries):
    sims = jnp.matmul(l2_normalize(queries.astype(jnp.float32)), train_feats.T, precision=_HIGHEST)
    top_sims, top_index = jax.lax.top_k(sims, k)
    # exp((s - s_max) / T): the same vote ratios as exp(s / T), without overflow at tiny T.
    weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
    votes = jax.nn.one_hot(train_labels[top_index], num_classes, dtype=jnp.float32)
    return jnp.argmax(jnp.einsum("qk,qkc->qc", weights, votes), axis=1).astype(jnp.int32)

  return jax.lax.map(classify_chunk, query_chunks)


def knn_classify(train_feats: jax.Array, train_labels: jax.Array, query_feats: jax.Array, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 256) -> jax.Array:
  """Weighted kNN class predictions [Q] for `query_feats` [Q, D] from a bank [N, D] with labels [N].

  Cosine similarity, the k most similar bank entries vote for their class with weight
  exp(sim / temperature) (Wu et al. 2018; DINO's kNN uses k = 20, T = 0.07). Queries are processed
  `chunk_size` at a time (the last chunk zero-padded), so memory is O(chunk_size * N).
  """
  _check_features(train_feats, "train_feats")
  _check_features(query_feats, "query_feats")
  num_train = train_feats.shape[0]
  if not 1 <= k <= num_train:
    raise ConfigError(f"knn k={k} must be in [1, {num_train}] (the number of bank features)")
  if not temperature > 0:
    raise ConfigError(f"knn temperature must be > 0, got {temperature}; DINO uses 0.07")
  if chunk_size < 1 or num_classes < 1:
    raise ConfigError(f"knn chunk_size ({chunk_size}) and num_classes ({num_classes}) must be >= 1")
  num_queries = query_feats.shape[0]
  chunk_size = min(chunk_size, max(num_queries, 1))
  num_chunks = -(-num_queries // chunk_size)
  padded = jnp.pad(jnp.asarray(query_feats), ((0, num_chunks * chunk_size - num_queries), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk_size, -1)
  predictions = _knn_chunks(jnp.asarray(train_feats), jnp.asarray(train_labels), chunks,
                            jnp.float32(temperature), num_classes=num_classes, k=k,
                            chunk_size=chunk_size)
  return predictions.reshape(-1)[:num_queries]


class RidgeProbe(NamedTuple):
  """A fitted ridge probe: standardise with (feature_mean, feature_scale), then x @ weights + bias."""
  feature_mean: jax.Array   # [D] train mean
  feature_scale: jax.Array  # [D] train standard deviation (1 where a feature is constant)
  weights: jax.Array        # [D, C]
  bias: jax.Array           # [C] = the train class frequencies (the targets' mean)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _ridge_fit(feats, labels, l2, *, num_classes):
  feats = feats.astype(jnp.float32)
  mean = jnp.mean(feats, axis=0)
  std = jnp.std(feats, axis=0)
  scale = jnp.where(std > 1e-6 * jnp.maximum(jnp.max(std), 1e-30), std, 1.0)
  standardized = (feats - mean) / scale
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  bias = jnp.mean(targets, axis=0)
  gram = jnp.matmul(standardized.T, standardized, precision=_HIGHEST)
  # Ridge strength relative to the mean eigenvalue of X^T X (= trace / D): the same `l2` means the same
  # thing for any number of examples and any feature scale.
  ridge = l2 * jnp.trace(gram) / gram.shape[0]
  # The features are centred, so a centred target needs no intercept column; the bias is its mean.
  rhs = jnp.matmul(standardized.T, targets - bias, precision=_HIGHEST)
  cholesky = jax.scipy.linalg.cho_factor(gram + ridge * jnp.eye(gram.shape[0]), lower=True)
  weights = jax.scipy.linalg.cho_solve(cholesky, rhs)
  return RidgeProbe(mean, scale, weights, bias)


def ridge_probe_fit(feats: jax.Array, labels: jax.Array, *, num_classes: int,
                    l2: float = 1e-3) -> RidgeProbe:
  """Closed-form ridge regression from features [N, D] onto centred one-hot targets of `labels` [N].

  Features are standardised with the train mean and standard deviation (kept in the probe);
  W = (X^T X + l2 * mean_eig(X^T X) I)^{-1} X^T (Y - mean(Y)), bias = mean(Y). Making `l2` relative to
  the mean eigenvalue of X^T X (trace / D) makes it scale-free: independent of N and of the units of
  the features; 1e-3 is light regularisation, ~1 is heavy.
  """
  _check_features(feats, "feats")
  if not l2 > 0:
    raise ConfigError(f"ridge l2 must be > 0 (relative to the mean eigenvalue), got {l2}; try 1e-3")
  if jnp.shape(labels) != (feats.shape[0],):
    raise ConfigError(f"ridge labels must have shape [N] = ({feats.shape[0]},), got "
                      f"{jnp.shape(labels)}")
  return _ridge_fit(jnp.asarray(feats), jnp.asarray(labels), jnp.float32(l2),
                    num_classes=num_classes)


@jax.jit
def ridge_probe_scores(probe: RidgeProbe, feats: jax.Array) -> jax.Array:
  """Class scores [N, C] of a fitted ridge probe for features [N, D]."""
  standardized = (feats.astype(jnp.float32) - probe.feature_mean) / probe.feature_scale
  return jnp.matmul(standardized, probe.weights, precision=_HIGHEST) + probe.bias


def ridge_probe_predict(probe: RidgeProbe, feats: jax.Array) -> jax.Array:
  """Predicted classes [N] (argmax of `ridge_probe_scores`)."""
  _check_features(feats, "feats")
  return jnp.argmax(ridge_probe_scores(probe, jnp.asarray(feats)), axis=1).astype(jnp.int32)


@jax.jit
def zero_shot_classify(image_emb: jax.Array, class_text_emb: jax.Array) -> jax.Array:
  """Zero-shot classes [N] for image embeddings [N, D] and prompt embeddings [C, P, D].

  Each class is the mean of its P L2-normalised prompt embeddings, renormalised (CLIP's prompt
  ensembling); an image goes to the class of highest cosine similarity.
  """
  _check_features(image_emb, "image_emb")
  _check_features(class_text_emb, "class_text_emb", rank=3, layout="[C, P, D]")
  class_emb = l2_normalize(jnp.mean(l2_normalize(class_text_emb.astype(jnp.float32)), axis=1))
  sims = jnp.matmul(l2_normalize(image_emb.astype(jnp.float32)), class_emb.T, precision=_HIGHEST)
  return jnp.argmax(sims, axis=1).astype(jnp.int32)


@jax.jit
def _rank_of_best_relevant(query, gallery, relevant):
  sims = jnp.matmul(l2_normalize(query.astype(jnp.float32)),
                    l2_normalize(gallery.astype(jnp.float32)).T, precision=_HIGHEST)
  best_relevant = jnp.max(jnp.where(relevant, sims, -jnp.inf), axis=1, keepdims=True)
  # 0-based rank of the best relevant item = how many items are strictly more similar; a query with
  # no relevant item gets rank M (never a hit).
  rank = jnp.sum(sims > best_relevant, axis=1)
  return jnp.where(jnp.any(relevant, axis=1), rank, gallery.shape[0])


def retrieval_recall(query: jax.Array, gallery: jax.Array, relevant: jax.Array,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k for each k: the fraction of queries [N, D] whose k most cosine-similar gallery items
  [M, D] include at least one relevant one (`relevant` [N, M] bool). Returns {"recall@k": value}.

  A query with no relevant item counts as a miss. Ties in similarity are resolved in the relevant
  item's favour (it ranks above equally similar items).
  """
  _check_features(query, "query")
  _check_features(gallery, "gallery")
  if jnp.shape(relevant) != (query.shape[0], gallery.shape[0]):
    raise ConfigError(f"relevant must have shape [N, M] = ({query.shape[0]}, {gallery.shape[0]}), "
                      f"got {jnp.shape(relevant)}")
  bad_ks = [k for k in ks if not 1 <= k <= gallery.shape[0]]
  if bad_ks:
    raise ConfigError(f"retrieval ks {bad_ks} out of range: each k must be in [1, {gallery.shape[0]}]"
                      " (the gallery size)")
  rank = np.asarray(_rank_of_best_relevant(jnp.asarray(query), jnp.asarray(gallery),
                                           jnp.asarray(relevant, bool)))
  return {f"recall@{k}": float(np.mean(rank < k)) for k in ks}
