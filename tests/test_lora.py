"""LoRA (jtl/lora.py), the trainable presets (jtl/masks.py) and the merged export (experiments/export.py).

References are written plainly here in NumPy: the adapted layer is x W + b + s (x A) B, and the merged
kernel is W + s A B reshaped to W's shape (for a conv, [kh*kw*c_in, c_out] row-major).
"""
import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from experiments import cli
from experiments import export as export_entry
from jtl import data, lora, masks, models, objectives, phases, pretrained, train
from jtl.errors import ConfigError
from tests.helpers import digits_config


def lora_cfg(rank=2, alpha=3.0, rslora=False, rules=(("params/backbone/.*", True), (".*", False))):
  return ml_collections.ConfigDict(dict(rules=rules, rank=rank, alpha=alpha, rslora=rslora))


def flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def with_random_adapters(params, seed=0, std=0.1):
  """The adapters a few training steps would leave: B no longer zero (and A perturbed)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + std * rng.standard_normal(x.shape).astype(np.float32)
      if getattr(path[-1], "key", "") in ("lora_a", "lora_b") else x, params)


def numpy_merge(params, scale):
  out = {}
  for path, value in flat(params).items():
    module, leaf = path.rsplit("/", 1)
    if leaf in ("lora_a", "lora_b"):
      continue
    if leaf == "kernel" and f"{module}/lora_a" in flat(params):
      a, b = np.asarray(flat(params)[f"{module}/lora_a"]), np.asarray(flat(params)[f"{module}/lora_b"])
      value = np.asarray(value) + scale * (a.astype(np.float64) @ b).reshape(value.shape)
    out[tuple(path.split("/"))] = np.asarray(value, np.float32)
  return traverse_util.unflatten_dict(out)


def test_dense_adapter_is_x_w_plus_scaled_low_rank_update():
  cfg = lora_cfg(rank=2, alpha=3.0, rules=((".*", True),))
  dense = nn.Dense(5)
  x = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
  with lora.adapters(cfg):
    params = dense.init(jax.random.key(0), x)["params"]
  assert params["lora_a"].shape == (7, 2) and params["lora_b"].shape == (2, 5)
  assert not np.any(params["lora_b"])  # zero-initialised: an untrained adapter changes nothing
  assert abs(np.std(params["lora_a"]) * np.sqrt(7) - 1) < 0.6  # N(0, 1/d_in)
  params = with_random_adapters(params)
  with lora.adapters(cfg):
    got = dense.apply({"params": params}, x)
  w, b, a, bb = (np.asarray(params[k], np.float64) for k in ("kernel", "bias", "lora_a", "lora_b"))
  np.testing.assert_allclose(got, x @ w + b + 1.5 * (x @ a) @ bb, atol=1e-5)
  cfg.rslora = True  # alpha / sqrt(r)
  with lora.adapters(cfg):
    got = dense.apply({"params": params}, x)
  np.testing.assert_allclose(got, x @ w + b + 3.0 / np.sqrt(2) * (x @ a) @ bb, atol=1e-5)


@pytest.mark.parametrize("model_config", [
    dict(name="cnn_small", widths=(4, 8)),  # Conv kernels [3, 3, c_in, c_out]
    dict(name="vit", patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=16),  # + DenseGeneral
], ids=["conv", "attention"])
def test_untrained_adapter_is_the_base_model_and_merge_matches_the_adapter(model_config):
  cfg = lora_cfg()
  base = models.build(ml_collections.ConfigDict(dict(num_classes=3, **model_config)))
  adapted = lora.wrap(base, cfg)
  x = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
  # Values at random (kernels, BatchNorm statistics > 0, a non-zero head), the adapters untrained:
  # B = 0 (the zero init itself is checked on a Dense above).
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: np.zeros(a.shape, a.dtype) if path[-1].key == "lora_b" else
      (0.3 * rng.standard_normal(a.shape) + 0.5).astype(a.dtype),
      jax.eval_shape(adapted.init, jax.random.key(0), x))
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  adapters = lora.adapter_paths(params)
  kernels = [p for p in masks.leaf_paths(params) if p.startswith("params/backbone") and
             p.endswith("/kernel")]
  assert sorted(adapters) == sorted(p[:-len("kernel")] + n for p in kernels
                                    for n in ("lora_a", "lora_b"))
  if model_config["name"] == "vit":
    assert "params/backbone/block0/attn/query/lora_a" in adapters
    assert flat(params)["backbone/block0/attn/out/lora_a"].shape == (8, 2)  # [heads*head_dim, r]
  plain = {k: v for k, v in flat(params).items() if not k.endswith(("lora_a", "lora_b"))}
  plain = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in plain.items()})
  untrained = params
  run_adapted, run_base = jax.jit(adapted.apply), jax.jit(base.apply)  # one compile each
  base_out = np.asarray(run_base({"params": plain, **state}, x))
  np.testing.assert_array_equal(run_adapted({"params": untrained, **state}, x), base_out)
  trained = with_random_adapters(untrained)
  out = np.asarray(run_adapted({"params": trained, **state}, x))
  scale = 3.0 / 2
  reference = run_base({"params": numpy_merge(trained, scale), **state}, x)
  assert np.abs(out - base_out).max() > 1e-2
  np.testing.assert_allclose(out, reference, atol=1e-5)
  merged = lora.merge(trained, cfg)
  assert not lora.adapter_paths(merged)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(numpy_merge(trained, scale))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_lora_configs_are_config_errors():
  base = models.build(ml_collections.ConfigDict(dict(name="cnn_small", widths=(4,), num_classes=2)))
  x = jnp.zeros((1, 8, 8, 1))
  for cfg, expected in ((lora_cfg(rank=-1), "lora.rank"), (lora_cfg(alpha=0.0), "lora.alpha"),
                        (lora_cfg(rules=(("params/backbone/stage9/.*", True), (".*", False))),
                         "config.lora.rules pattern 'params/backbone/stage9/.*' matches no")):
    with pytest.raises(ConfigError, match=expected):
      jax.eval_shape(lora.wrap(base, cfg).init, jax.random.key(0), x)


def test_presets_select_the_documented_leaves():
  cnn = models.build(ml_collections.ConfigDict(dict(name="cnn_small", widths=(4, 8), num_classes=2)))
  params = jax.eval_shape(lambda x: lora.wrap(cnn, lora_cfg()).init(jax.random.key(0), x),
                          jnp.zeros((1, 8, 8, 1)))["params"]

  def chosen(rules, tree=params):
    return sorted(p for p, m in zip(masks.leaf_paths(tree),
                                    jax.tree.leaves(masks.trainable_mask(tree, rules))) if m)
  head = ["params/head/bias", "params/head/kernel"]
  assert chosen("head_only") == head
  # BatchNorm shifts are cnn_small's only biases (its convs have none); scales and kernels stay.
  assert chosen("bitfit") == sorted(head + ["params/backbone/stage1/bn/bias",
                                            "params/backbone/stage2/bn/bias"])
  assert chosen("lora") == sorted(head + [f"params/backbone/stage{i}/conv/lora_{n}"
                                          for i in (1, 2) for n in "ab"])
  assert chosen("params/head/kernel") == ["params/head/kernel"]  # other strings: a bare pattern
  # As a phase's rule table: the head joins in phase 0, the biases in phase 1, the rest in phase 2.
  config = ml_collections.ConfigDict(dict(total_steps=30, trainable=".*", phases=(
      (0, "head_only"), (10, "bitfit"), (20, ((".*", True),)))))
  groups = dict(zip(masks.leaf_paths(params), jax.tree.leaves(phases.join_groups(params, config))))
  assert {p for p, g in groups.items() if g == 0} == set(head)
  assert {p for p, g in groups.items() if g == 1} == {f"params/backbone/stage{i}/bn/bias"
                                                      for i in (1, 2)}
  vit = models.build(ml_collections.ConfigDict(dict(name="vit", patch_size=4, width=8, depth=1,
                                                    num_heads=2, mlp_dim=16, num_classes=2)))
  vit_params = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  biases = chosen("bitfit", vit_params)
  assert "params/backbone/block0/norm1/bias" in biases  # LayerNorm beta counts as a bias
  assert "params/backbone/block0/attn/query/bias" in biases
  assert not [p for p in biases if not p.startswith("params/head/") and
              p.endswith(("scale", "kernel", "pos_embed", "cls_token"))]
  with pytest.raises(ConfigError, match="lora.rank"):
    masks.trainable_mask(vit_params, "lora")


def run_cli(entry, *args):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(entry.define_flags, entry.main, [entry.__name__, *args])
  return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def test_lora_training_freezes_the_base_and_exports_merged_weights(tmp_path):
  # "Pretrained" weights: random values in a jtl-named .npz (no compilation needed to make them).
  plain = digits_config(total_steps=4, mesh__axes=(("data", 1),))
  batch = next(data.train_iterator(plain.data, global_batch_size=plain.batch_size, seed=0))
  shapes = jax.eval_shape(objectives.build(plain).init, jax.random.key(0), batch)
  rng = np.random.default_rng(0)
  source = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape) + 0.5).astype(a.dtype), shapes)
  pretrained.save_npz({"params": source[0], "model_state": source[1]}, tmp_path / "source.npz")
  config = digits_config(total_steps=4, checkpoint_every=4, mesh__axes=(("data", 1),),
                         trainable="lora", lora__rank=2, optim__lr=3e-2,
                         init_from__path=str(tmp_path / "source.npz"),
                         init_from__dont_load=("params/head/.*", ".*/lora_[ab]"))
  final = jax.device_get(train.train(config, str(tmp_path / "run")))
  # Optimizer state: the adapters and the head, nothing else (both Adam moment trees).
  optimized = {p for p in flat(final.params) if p.startswith("head/") or
               p.endswith(("/lora_a", "/lora_b"))}
  state_paths = masks.leaf_paths(final.opt_state, "")
  for moment in ("mu", "nu"):
    assert {p.split(f"/{moment}/", 1)[1] for p in state_paths if f"/{moment}/" in p} == optimized
  loaded = flat(source[0])
  for path, value in flat(final.params).items():
    if path not in optimized:  # base kernels and BatchNorm parameters: bit-identical to the file
      np.testing.assert_array_equal(value, loaded[path], err_msg=path)
  assert all(np.any(v) for p, v in flat(final.params).items() if p.endswith("lora_b"))  # trained
  # Export: the merged .npz loads into the plain model (no lora) and gives the adapter's logits.
  out = tmp_path / "merged.npz"
  assert run_cli(export_entry, f"--workdir={tmp_path / 'run'}", f"--out={out}") == (0, [])
  plain.init_from.path, plain.init_from.dont_load = str(out), ()
  params, model_state = train.load_transfer_source(train.setup(plain, batch))  # every leaf loaded
  model = objectives.build(config).model
  want = jax.jit(model.apply)({"params": final.params, **final.model_state}, batch["image"])
  got = jax.jit(objectives.build(plain).model.apply)({"params": params, **model_state},
                                                     batch["image"])
  np.testing.assert_allclose(got, want, atol=1e-5)
  unmerged = {**source[0], "head": final.params["head"]}  # the adapters made a difference
  assert np.abs(want - jax.jit(objectives.build(plain).model.apply)(
      {"params": unmerged, **model_state}, batch["image"])).max() > 1e-3
  status, errors = run_cli(export_entry, f"--workdir={tmp_path / 'run'}", f"--out={tmp_path}/x.bin")
  assert status == 2 and len(errors) == 1 and ".npz" in errors[0]
