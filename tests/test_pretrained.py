"""jtl.pretrained: torch-free reading of PyTorch files, name/layout mapping checked against logits
that torch computed (fixtures made by tests/fixtures/pretrained/make_fixtures.py), npz round trips,
pos_embed resizing and the error cases."""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jtl import models, pretrained
from jtl.errors import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
_spec = importlib.util.spec_from_file_location("pretrained_recipe",
                                               os.path.join(FIXTURES, "recipe.py"))
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

LOGIT_TOLERANCE = 1e-4
CONFIGS = {"resnet18": dict(name="resnet18", num_classes=10),
           "vit": dict(name="vit", num_classes=10, **recipe.VIT_JTL_OPTIONS)}


class Case:
  """One fixture model: torch's logits, the recipe's weights in a torch-named .safetensors, and
  what jtl made of them (loaded once per test module; the forward pass is jitted once)."""

  def __init__(self, name: str, directory: str):
    self.name = name
    fixture = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    self.torch_logits = fixture["logits"]
    self.images = jnp.asarray(fixture["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    self.shapes = {n: tuple(s) for n, s in json.loads(str(fixture["state_shapes"]))}
    self.torch_weights = recipe.fill(self.shapes)
    self.path = os.path.join(directory, f"{name}.safetensors")
    safetensors.numpy.save_file(self.torch_weights, self.path)
    self.model = models.build(ml_collections.ConfigDict(CONFIGS[name]))
    self.abstract = self.abstract_for(self.images.shape)
    self.loaded, self.report = pretrained.load_pretrained(self.path,
                                                          abstract_variables=self.abstract)
    self.forward = jax.jit(lambda variables, x: self.model.apply(variables, x, train=False))
    self.logits = self.apply(self.loaded)

  def abstract_for(self, image_shape, **options):
    model = models.build(ml_collections.ConfigDict({**CONFIGS[self.name], **options}))
    images = jnp.zeros(image_shape)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))

  def apply(self, loaded) -> np.ndarray:
    return np.asarray(self.forward({"params": loaded["params"], **loaded["model_state"]},
                                   self.images))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("pretrained"))
  return {name: Case(name, directory) for name in CONFIGS}


def leaf_count(tree) -> int:
  return len(jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_torch_named_weights_give_torchs_logits(cases, name):
  case = cases[name]
  assert case.report["missing"] == case.report["mismatched"] == case.report["unexpected"] == []
  assert len(case.report["loaded"]) == leaf_count(case.abstract)
  # Every file tensor was used except the BN step counters, which are ignored, not unexpected.
  used = {n for entry in case.report["loaded"] for n in entry.split(" <- ")[1].split(", ")}
  assert set(case.shapes) - used == {n for n in case.shapes if n.endswith("num_batches_tracked")}
  difference = np.abs(case.logits - case.torch_logits).max()
  assert difference < LOGIT_TOLERANCE, f"{name}: max |jtl - torch| logit difference {difference}"
  assert np.abs(case.torch_logits).max() > 0.5  # the logits are not trivially small


def test_resnet_layouts_and_report_names(cases):
  case, weights = cases["resnet18"], cases["resnet18"].torch_weights
  params, stats = case.loaded["params"]["backbone"], case.loaded["model_state"]["batch_stats"]
  # OIHW -> HWIO for a strided downsampling conv, transposed linear weight, BN statistics.
  np.testing.assert_array_equal(params["stage2_block0"]["downsample_conv"]["kernel"][0, 0],
                                weights["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(params["stem_conv"]["kernel"][1, 2, 0, 5],
                                weights["conv1.weight"][5, 0, 1, 2])
  np.testing.assert_array_equal(case.loaded["params"]["head"]["kernel"], weights["fc.weight"].T)
  np.testing.assert_array_equal(stats["backbone"]["stage4_block1"]["bn2"]["var"],
                                weights["layer4.1.bn2.running_var"])
  assert ("model_state/batch_stats/backbone/stem_bn/mean <- bn1.running_mean"
          in case.report["loaded"])


def test_vit_attention_split(cases):
  case, weights = cases["vit"], cases["vit"].torch_weights
  attn = case.loaded["params"]["backbone"]["block1"]["attn"]
  qkv, proj = weights["blocks.1.attn.qkv.weight"], weights["blocks.1.attn.proj.weight"]
  # Key head 2, feature 5: row 64 (key third) + 2 * 16 + 5 of timm's [3 * 64, 64] qkv matrix.
  np.testing.assert_array_equal(attn["key"]["kernel"][:, 2, 5], qkv[64 + 2 * 16 + 5])
  np.testing.assert_array_equal(attn["value"]["bias"][3],
                                weights["blocks.1.attn.qkv.bias"][128 + 3 * 16:128 + 4 * 16])
  np.testing.assert_array_equal(attn["out"]["kernel"][1, 4], proj[:, 1 * 16 + 4])


def test_torch_reader_matches_torch():
  expected = np.load(os.path.join(FIXTURES, "torch_expected.npz"))
  for filename, dtypes in [("tensors", {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                                        "int64": np.int64, "boolean": np.bool_}),
                           ("checkpoint", {})]:
    tensors = pretrained.read_state_dict(os.path.join(FIXTURES, f"{filename}.pt"))
    names = sorted(k.split("/", 1)[1] for k in expected.files if k.startswith(f"{filename}/"))
    assert sorted(tensors) == names
    for name, array in tensors.items():
      reference = expected[f"{filename}/{name}"]
      assert array.dtype == np.dtype(dtypes.get(name, reference.dtype)), name
      assert array.flags["C_CONTIGUOUS"] and array.shape == reference.shape, name
      np.testing.assert_array_equal(np.asarray(array, reference.dtype), reference, err_msg=name)
  # The non-contiguous view: base.t()[1:, ::2] of base = arange(24).reshape(4, 6).
  np.testing.assert_array_equal(expected["tensors/view"], np.arange(24.0).reshape(4, 6).T[1:, ::2])


class _RunsCode:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_torch_reader_refuses_code_and_legacy_files(tmp_path):
  marker = tmp_path / "ran"
  evil = tmp_path / "evil.pt"
  with zipfile.ZipFile(evil, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps(
        collections.OrderedDict(w=_RunsCode(str(marker))), protocol=2))
  with pytest.raises(ConfigError, match=r"refusing to load (posix|nt)\.system"):
    pretrained.load_pretrained(evil, abstract_variables={"params": {}})
  assert not marker.exists()
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # torch's legacy magic
  with pytest.raises(ConfigError, match="legacy.*re-save"):
    pretrained.read_tensors(legacy)


BIG_VISION_BLOCK = ["LayerNorm_0/scale", "LayerNorm_0/bias", "LayerNorm_1/scale",
                    "LayerNorm_1/bias", "MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_0/bias",
                    "MlpBlock_0/Dense_1/kernel", "MlpBlock_0/Dense_1/bias"] + [
    f"MultiHeadDotProductAttention_0/{m}/{leaf}" for m in ("query", "key", "value", "out")
    for leaf in ("kernel", "bias")]
# big_vision -> vit_jax renames (big_vision/models/vit.py and vit_jax checkpoints).
VIT_JAX_RENAMES = [("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
                   ("LayerNorm_1", "LayerNorm_2"), ("MlpBlock_0", "MlpBlock_3")]


def test_npz_round_trips(cases, tmp_path):
  vit = cases["vit"]
  exported = tmp_path / "vit_bv.npz"
  pretrained.save_npz(vit.loaded, exported, naming="big_vision")
  with np.load(exported) as npz:
    bv = dict(npz)
  assert set(bv) == {"embedding/kernel", "embedding/bias", "cls", "pos_embedding",
                     "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias",
                     "head/kernel", "head/bias"} | {
      f"Transformer/encoderblock_{i}/{n}" for i in range(2) for n in BIG_VISION_BLOCK}
  assert bv["pos_embedding"].shape == (1, 16, 64)  # big_vision: no class-token row
  back, report = pretrained.load_pretrained(exported, abstract_variables=vit.abstract)
  assert report["convention"] == "big_vision ViT" and not report["missing"] + report["unexpected"]
  assert any("zero class-token row" in note for note in report["notes"])
  np.testing.assert_array_equal(vit.apply(back), vit.logits)

  # vit_jax names (posemb with a class-token row, other module indices) and big_vision's scanned
  # layout, both under a `params/` prefix: the same params come back.
  vit_jax = {"Transformer/posembed_input/pos_embedding": np.concatenate(
      [np.zeros((1, 1, 64), np.float32), bv.pop("pos_embedding")], axis=1)}
  for name, value in bv.items():
    for old, new in VIT_JAX_RENAMES:
      name = name.replace(old, new)
    vit_jax[name] = value
  scanned = {k: v for k, v in bv.items() if "encoderblock_" not in k}
  for leaf in BIG_VISION_BLOCK:
    scanned[f"Transformer/encoderblock/{leaf}"] = np.stack(
        [bv[f"Transformer/encoderblock_{i}/{leaf}"] for i in range(2)])
  scanned["pos_embedding"] = vit_jax["Transformer/posembed_input/pos_embedding"][:, 1:]
  for naming, tensors in [("vit_jax ViT", vit_jax), ("big_vision ViT", scanned)]:
    path = tmp_path / "other.npz"
    np.savez(path, **{f"params/{k}": v for k, v in tensors.items()})
    other, report = pretrained.load_pretrained(path, abstract_variables=vit.abstract)
    assert report["convention"] == naming and len(report["loaded"]) == leaf_count(vit.abstract)
    same = jax.tree.map(np.array_equal, other["params"], back["params"])
    assert all(jax.tree.leaves(same)), naming

  # jtl names (BatchNorm statistics included), here as .safetensors: identical arrays.
  resnet = cases["resnet18"]
  flat = {**pretrained.naming.flatten(resnet.loaded["params"], "params"),
          **pretrained.naming.flatten(resnet.loaded["model_state"], "model_state")}
  safetensors.numpy.save_file(flat, tmp_path / "resnet_jtl.safetensors")
  pretrained.save_npz(resnet.loaded, tmp_path / "resnet_jtl.npz")
  for filename in ("resnet_jtl.safetensors", "resnet_jtl.npz"):
    again, report = pretrained.load_pretrained(tmp_path / filename,
                                               abstract_variables=resnet.abstract)
    assert report["convention"] == "jtl" and len(report["loaded"]) == 102
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, resnet.loaded)))


def reference_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(jax.image.resize(jnp.asarray(grid), (size, size, grid.shape[-1]), "linear",
                                     antialias=False))


def test_pos_embed_resize(cases):
  vit = cases["vit"]
  abstract = vit.abstract_for((1, 64, 64, 3))  # grid 8x8 instead of the file's 4x4
  loaded, report = pretrained.load_pretrained(vit.path, abstract_variables=abstract)
  assert report["notes"] == ["pos_embed: grid resized 4x4 -> 8x8 (bilinear), class-token row kept"]
  assert len(report["loaded"]) == leaf_count(abstract)
  source = vit.torch_weights["pos_embed"]
  pos = loaded["params"]["backbone"]["pos_embed"]
  assert pos.shape == (1, 65, 64)
  np.testing.assert_array_equal(pos[0, 0], source[0, 0])
  np.testing.assert_allclose(pos[0, 1:].reshape(8, 8, 64),
                             reference_bilinear(source[0, 1:].reshape(4, 4, 64), 8), atol=1e-6)
  # Down-sampling (4x4 -> 2x2 at 16 px) and a model without class token (row dropped).
  gap = vit.abstract_for((1, 16, 16, 3), pool="gap")
  loaded, report = pretrained.load_pretrained(vit.path, abstract_variables=gap)
  assert report["notes"] == ["pos_embed: grid resized 4x4 -> 2x2 (bilinear)"]
  assert report["unexpected"] == ["cls_token"]
  np.testing.assert_allclose(loaded["params"]["backbone"]["pos_embed"][0].reshape(2, 2, 64),
                             reference_bilinear(source[0, 1:].reshape(4, 4, 64), 2), atol=1e-6)


def test_mismatch_missing_and_merge(cases, tmp_path):
  resnet = cases["resnet18"]
  abstract = resnet.abstract_for((1, 32, 32, 3), num_classes=5)
  loaded, report = pretrained.load_pretrained(resnet.path, abstract_variables=abstract)
  assert report["mismatched"] == ["params/head/bias (5,) <- fc.bias (10,)",
                                  "params/head/kernel (512, 5) <- fc.weight (10, 512)"]
  assert "head" not in loaded["params"] and len(report["loaded"]) == 100
  fresh = jax.tree.map(lambda s: np.full(s.shape, -1.0, s.dtype), abstract)
  merged = pretrained.merge_into(fresh, loaded)
  assert (merged["params"]["head"]["kernel"] == -1).all()
  np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["stem_bn"]["mean"],
                                resnet.torch_weights["bn1.running_mean"])
  # A file without the head, saved by DataParallel (`module.` prefix): head missing, rest loads.
  wrapped = {f"module.{k}": v for k, v in resnet.torch_weights.items() if not k.startswith("fc.")}
  safetensors.numpy.save_file(wrapped, tmp_path / "headless.safetensors")
  loaded, report = pretrained.load_pretrained(tmp_path / "headless.safetensors",
                                              abstract_variables=resnet.abstract)
  assert report["missing"] == ["params/head/bias <- fc.bias", "params/head/kernel <- fc.weight"]
  assert report["notes"] == ["stripped the 'module.' prefix"]
  text = pretrained.format_report(report, "headless.safetensors")
  assert "loaded 100" in text and "missing 2" in text


def test_errors(cases, tmp_path):
  resnet, vit = cases["resnet18"], cases["vit"]
  with pytest.raises(ConfigError, match="does not exist"):
    pretrained.load_pretrained(tmp_path / "nope.pt", abstract_variables=resnet.abstract)
  with pytest.raises(ConfigError, match="cannot tell the format of .*weights.ckpt"):
    pretrained.load_pretrained(tmp_path / "weights.ckpt", abstract_variables=resnet.abstract)
  with pytest.raises(ConfigError, match="unknown pretrained format 'onnx'"):
    pretrained.load_pretrained(resnet.path, abstract_variables=resnet.abstract, format="onnx")
  with pytest.raises(ConfigError, match="not a PyTorch zip file"):
    pretrained.load_pretrained(resnet.path, abstract_variables=resnet.abstract, format="torch")
  with pytest.raises(ConfigError, match="as .npz"):
    pretrained.load_pretrained(resnet.path, abstract_variables=resnet.abstract, format="npz")
  with pytest.raises(ConfigError, match="no tensor of .*vit.safetensors .*fits this model's"):
    pretrained.load_pretrained(vit.path, abstract_variables=resnet.abstract)
  safetensors.numpy.save_file({"encoder.w": np.zeros(2, np.float32)}, tmp_path / "odd.safetensors")
  with pytest.raises(ConfigError, match="cannot tell which naming"):
    pretrained.load_pretrained(tmp_path / "odd.safetensors", abstract_variables=resnet.abstract)
  with pytest.raises(ConfigError, match="saves ViT params only"):
    pretrained.save_npz(resnet.loaded, tmp_path / "r.npz", naming="big_vision")
