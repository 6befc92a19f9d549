"""CLIP/SigLIP objective, the text tower and the tokenizer: training, 8 devices == 1, chunked ==
plain, captions drawn from the training templates, padding invariance, tokenizer conventions."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jtl import augment, evaluate, masks, train
from jtl import text as tokenizer
from jtl.data import pipeline
from jtl.errors import ConfigError
from jtl.models.text import TextTransformer
from jtl.objectives import build as build_objective
from jtl.objectives import clip
from jtl.objectives.base import apply_model
from tests import test_representation_evaluators as references
from tests.helpers import compile_fast  # noqa: F401  (autouse: this module compiles fast)
from tests.helpers import (assert_mesh_equals_one_device, digits_config, fixed_batch,
                           loss_before_and_after)

STEPS = 6


def clip_config(loss="softmax", **overrides):
  """Digits 0-4, a tiny image tower (a one-stage cnn_small: on 2 cores these tests are mostly
  compile time, and each conv's init alone costs seconds) and text tower (width 16, one block)."""
  config = digits_config(objective="clip", total_steps=STEPS, log_every=STEPS,
                         checkpoint_every=100, optim__lr=1e-2,
                         **{"model__widths": (8,), **overrides})
  config.clip = clip.default_config()
  config.clip.update(dict(loss=loss, embed_dim=16, text_width=16, text_depth=1, text_heads=2,
                          augment_images=False))
  config.augment = augment.default_config()
  return config


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  """CLIP trained STEPS steps on 8 devices: (config, final state, workdir)."""
  config, workdir = clip_config(), tmp_path_factory.mktemp("clip")
  return config, train.train(config, str(workdir)), workdir


def test_clip_trains_with_a_learnable_clamped_log_scale(clip_run):
  config, state, _ = clip_run
  (fresh_params, _), before, after = loss_before_and_after(config, state)
  assert after < before - 0.05, (before, after)
  np.testing.assert_allclose(float(fresh_params["log_scale"]), math.log(1 / 0.07), rtol=1e-6)
  assert float(state.params["log_scale"]) != float(fresh_params["log_scale"])  # it trains
  paths = masks.leaf_paths(state.params, "params")
  assert {p.split("/")[1] for p in paths} == {"backbone", "projection", "text", "log_scale"}
  assert "params/backbone/stage1/conv/kernel" in paths
  assert "params/text/block0/attention/query/kernel" in paths


def test_clip_eight_devices_equal_one_device(clip_run):
  """Three trainer steps from the same variables on 8 devices and on 1 (loss, params and BatchNorm
  statistics within 1e-5). The 8-device programs are the fixture run's, from the cache."""
  config, _, _ = clip_run
  assert_mesh_equals_one_device(config)


def test_zero_shot_and_retrieval_from_the_checkpoint_equal_numpy_references(clip_run):
  """`evaluate_checkpoints` with the zero-shot and retrieval evaluators on the CLIP run's
  checkpoint, against plain numpy zero-shot and recall on the towers' embeddings of the test
  images and the held-out prompts."""
  config, state, workdir = clip_run
  config = config.copy_and_resolve_references()
  config.evals = dict(zero_shot=dict(type="zero_shot", chance=True),
                      retrieval=dict(type="retrieval", chance=True))
  row, = evaluate.evaluate_checkpoints(config, str(workdir))
  obj = build_objective(config)
  images, targets = pipeline.load_in_memory(config.data, "test")  # digits 0-4
  labels = targets["label"]
  image_emb = np.asarray(jax.jit(obj.embed_images)(state.params, state.model_state,
                                               images.astype(np.float32) / 255))
  prompts = obj.prompt_tokens(config.data.labels)  # [5, 4, L]
  text_emb = np.asarray(jax.jit(obj.embed_text)(state.params, state.model_state,
                                            prompts.reshape(-1, prompts.shape[-1])))
  expected = np.mean(references.np_zero_shot(image_emb, text_emb.reshape(5, 4, -1)) == labels)
  assert row["test/zero_shot_accuracy"] == pytest.approx(expected)
  relevant = labels[:, None] == np.repeat(np.arange(5), 4)[None, :]
  for k in (1, 5, 10):
    assert row[f"test/retrieval_i2t_r{k}"] == pytest.approx(
        references.np_recall(image_emb, text_emb, relevant, k))
    assert row[f"test/retrieval_t2i_r{k}"] == pytest.approx(
        references.np_recall(text_emb, image_emb, relevant.T, k))
  # chance=True: the same metrics for a uniform guess and a random ranking. Recall@k at chance is
  # P(a hypergeometric draw of k from the gallery holds a relevant item), scipy's, per query.
  assert row["test/zero_shot_accuracy_chance"] == pytest.approx(1 / 5)
  counts = np.bincount(labels, minlength=5)
  for k in (1, 5, 10):
    i2t = 1 - stats.hypergeom(20, 4, k).pmf(0)  # 20 captions, 4 of the image's class
    t2i = np.mean([1 - stats.hypergeom(len(labels), counts[c], k).pmf(0)
                   for c in np.repeat(np.arange(5), 4)])
    assert row[f"test/retrieval_i2t_r{k}_chance"] == pytest.approx(i2t, rel=1e-9)
    assert row[f"test/retrieval_t2i_r{k}_chance"] == pytest.approx(t2i, rel=1e-9)


def test_chunked_siglip_trains_from_the_paper_init(tmp_path):
  config = clip_config("sigmoid")
  config.clip.chunked = True
  state = train.train(config, str(tmp_path))
  (fresh_params, _), before, after = loss_before_and_after(config, state)
  assert after < before - 0.05, (before, after)
  np.testing.assert_allclose(float(fresh_params["log_t"]), math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(float(fresh_params["bias"]), -10.0)
  assert "log_scale" not in state.params


def test_chunked_siglip_objective_equals_the_plain_one():
  """Same value and gradients (w.r.t. embeddings and the learnable scalars) on 8 devices."""
  plain = build_objective(clip_config("sigmoid"))
  config = clip_config("sigmoid")
  config.clip.chunked = True
  chunked = build_objective(config)
  assert chunked.chunked_mesh.size == 8
  rng = np.random.RandomState(0)
  image, text = rng.randn(16, 16).astype(np.float32), rng.randn(16, 16).astype(np.float32)
  scalars = {"log_t": jnp.float32(math.log(10.0)), "bias": jnp.float32(-10.0)}
  grad = lambda obj: jax.jit(jax.value_and_grad(obj.pair_loss, argnums=(0, 1, 2)))(  # noqa: E731
      image, text, scalars)
  (value_plain, grads_plain), (value_chunked, grads_chunked) = grad(plain), grad(chunked)
  np.testing.assert_allclose(value_chunked, value_plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_chunked), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_captions_are_training_templates_of_the_right_class():
  obj = build_objective(clip_config())  # digits 0-4
  labels = jnp.asarray(np.arange(64) % 5, jnp.int32)
  tokens = np.concatenate([np.asarray(obj.captions(labels, jax.random.key(seed)))
                           for seed in range(4)])
  seen = set()
  for row, label in zip(tokens, np.tile(np.arange(64) % 5, 4)):
    text = tokenizer.decode(row)
    matches = [t for t in range(len(tokenizer.TEMPLATES)) if tokenizer.caption(t, label) == text]
    assert matches and set(matches) <= set(tokenizer.TRAIN_TEMPLATES), text
    seen.add(matches[0])
  assert len(seen) == tokenizer.NUM_TRAIN_TEMPLATES  # every template drawn, in 256 draws
  prompts = obj.prompt_tokens((5, 9))
  assert prompts.shape == (2, len(tokenizer.HELD_OUT_TEMPLATES), obj.max_len)
  assert tokenizer.decode(prompts[1, 0]) == "a drawing of the digit nine"


@pytest.mark.parametrize("pooling", ["eos", "mean"])
def test_text_tower_ignores_padding_and_reads_every_word(pooling):
  tower = TextTransformer(vocab_size=tokenizer.vocab_size(), max_len=12, embed_dim=8, width=16,
                          depth=2, heads=2, pooling=pooling)
  captions = ["a photo of the digit seven", "a photo of the digit nine", "seven"]
  short = np.stack([tokenizer.encode(c, 8) for c in captions])
  long = np.stack([tokenizer.encode(c, 12) for c in captions])
  params = jax.jit(tower.init)(jax.random.key(0), long)
  apply = jax.jit(tower.apply)
  emb_short, emb_long = np.asarray(apply(params, short)), np.asarray(apply(params, long))
  np.testing.assert_allclose(emb_short, emb_long, rtol=1e-5, atol=1e-6)
  assert np.abs(emb_short[0] - emb_short[1]).max() > 1e-3  # only the last word differs
  np.testing.assert_allclose(np.asarray(apply(params, long[::-1])), emb_long[::-1], rtol=1e-5,
                             atol=1e-6)


def test_tokenizer_conventions():
  assert 10 <= len(tokenizer.TEMPLATES) <= 20
  assert tokenizer.HELD_OUT_TEMPLATES and not (
      set(tokenizer.HELD_OUT_TEMPLATES) & set(tokenizer.TRAIN_TEMPLATES))
  assert len({tokenizer.caption(t, 7) for t in range(len(tokenizer.TEMPLATES))}) == len(
      tokenizer.TEMPLATES)
  for t in range(len(tokenizer.TEMPLATES)):
    for digit in range(10):
      text = tokenizer.caption(t, digit)
      tokens = tokenizer.encode(text, tokenizer.MIN_MAX_LEN)
      assert tokenizer.decode(tokens) == text
      assert tokenizer.UNK_ID not in tokens
      words = len(text.split())
      assert tokens[words] == tokenizer.EOS_ID and not np.any(tokens[words + 1:])
      np.testing.assert_array_equal(tokenizer.mask(tokens), np.arange(len(tokens)) <= words)
  assert tokenizer.encode("a photo of a zebra", 8)[4] == tokenizer.UNK_ID
  with pytest.raises(ConfigError, match="max_len"):
    tokenizer.encode("a photo of the digit seven", 6)
  with pytest.raises(ConfigError, match="digits 0..9"):
    tokenizer.caption(0, 10)


@pytest.mark.parametrize("key, value, message", [
    ("loss", "hinge", "unknown clip.loss"),
    ("lost", "softmax", "did you mean 'loss'"),
    ("chunked", True, "needs clip.loss='sigmoid'"),
    ("text_heads", 3, "divisible"),
    ("max_len", 5, "longest caption"),
    ("text_pooling", "cls", "text_pooling"),
])
def test_bad_options_are_one_line_config_errors(key, value, message):
  config = clip_config()
  config.clip[key] = value
  with pytest.raises(ConfigError, match=message):
    build_objective(config)


def np_clip_loss(image, text, log_scale):
  """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3), pair i = (image i, text i)."""
  image = image / np.linalg.norm(image, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  logits = np.exp(log_scale) * image @ text.T

  def ce_of_the_diagonal(z):
    z = z - z.max(axis=1, keepdims=True)
    return -(np.diag(z) - np.log(np.exp(z).sum(axis=1)))
  return np.mean((ce_of_the_diagonal(logits) + ce_of_the_diagonal(logits.T)) / 2)


def test_each_image_is_paired_with_its_own_caption():
  """The training loss is CLIP's loss of (image i, caption i) pairs, the captions those `captions`
  draws for the batch's labels: recomputed in numpy from the two towers' embeddings, and different
  from the loss of captions shifted by one example."""
  config = clip_config(mesh__axes=(("data", 1),))
  obj = build_objective(config)
  batch = jax.device_put(fixed_batch(config))
  params, model_state = jax.jit(obj.init)(jax.random.key(0), batch)
  trainable = masks.trainable_mask(params, config.trainable)
  rng = jax.random.key(3)

  @jax.jit
  def loss_and_embeddings(params):
    loss, _ = obj.loss(params, model_state, batch, rng, trainable=trainable)
    tokens = obj.captions(batch["label"], jax.random.fold_in(rng, 1))
    outputs, _ = apply_model(obj.model, params, model_state, (batch["image"], tokens),
                             train=True, trainable=trainable, rng=jax.random.fold_in(rng, 2))
    return loss, outputs

  loss, (image_emb, text_emb, scalars) = jax.device_get(loss_and_embeddings(params))
  image_emb, text_emb = np.float64(image_emb), np.float64(text_emb)
  expected = np_clip_loss(image_emb, text_emb, float(scalars["log_scale"]))
  shifted = np_clip_loss(image_emb, np.roll(text_emb, 1, axis=0), float(scalars["log_scale"]))
  assert abs(shifted - expected) > 1e-3 * expected  # the pairing shows in the loss
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
