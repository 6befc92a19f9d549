"""Real TFDS builders at real resolution, offline: `experiments.fake_tfds` stand-ins (the real
builder's features, random pixels), the ImageNet crops of jtl/data/preprocess.py against NumPy
references, and finetune_tfds.py from the CLI at 224x224 with a timm ViT-B/16 and a torchvision
ResNet-50 file (random weights under the real names and shapes)."""
import contextlib
import importlib.util
import io
import os
import re

import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf

from experiments import cli, fake_tfds
from experiments import evaluate as evaluate_entry
from experiments import train as train_entry
from experiments.configs import finetune_tfds
from jtl import data
from jtl.data import config as data_config_lib
from jtl.data import preprocess
from jtl.metric_writer import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "pretrained")
_spec = importlib.util.spec_from_file_location("pretrained_recipe", os.path.join(FIXTURES, "recipe.py"))
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)
CONFIG = os.path.join(ROOT, "experiments", "configs", "finetune_tfds.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """cifar10 (fixed 32x32) and imagenet2012 (images of varying size) stand-ins."""
  path = str(tmp_path_factory.mktemp("tfds"))
  fake_tfds.write("cifar10", path, {"train": 24, "test": 10})
  fake_tfds.write("imagenet2012", path, {"train": 12, "validation": 6}, image_size=96)
  return path


def _config(data_dir, **overrides):
  c = data_config_lib.default_data_config()
  splits = {"eval_split": "validation"} if overrides.get("name") == "imagenet2012" else {}
  c.update(dict(data_dir=data_dir, **splits, **overrides))
  return c


# ---- the crops against NumPy references ----------------------------------------------------------

def reference_box(u, height, width, area):
  """torchvision's RandomResizedCrop.get_params with the uniform draws `u` in place of its RNG."""
  lo, hi = np.log(3 / 4), np.log(4 / 3)
  for t in range(preprocess.CROP_TRIES):
    a, r, y, x = u[4 * t: 4 * t + 4]
    target = height * width * (area[0] + (area[1] - area[0]) * a)
    ratio = np.exp(lo + (hi - lo) * r)
    w = int(np.round(np.sqrt(target * ratio)))
    h = int(np.round(np.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(np.floor(y * (height - h + 1)))
      left = int(np.floor(x * (width - w + 1)))
      return top, left, top + h - 1, left + w - 1
  in_ratio = width / height
  if in_ratio < 3 / 4:
    w, h = width, int(np.round(width / (3 / 4)))
  elif in_ratio > 4 / 3:
    h, w = height, int(np.round(height * (4 / 3)))
  else:
    h, w = height, width
  top, left = (height - h) // 2, (width - w) // 2
  return top, left, top + h - 1, left + w - 1


def reference_crop(image, box, size):
  """Bilinear samples of `image` on a size x size grid spanning the box's corner pixels."""
  top, left, bottom, right = box
  ys = np.linspace(top, bottom, size[0])
  xs = np.linspace(left, right, size[1])
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, image.shape[0] - 1), np.minimum(x0 + 1, image.shape[1] - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  img = image.astype(np.float64)
  top_row = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
  bottom_row = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
  return np.clip(np.round(top_row * (1 - fy) + bottom_row * fy), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height,width,area", [(32, 32, (0.08, 1.0)), (60, 200, (0.5, 1.0)),
                                               (300, 40, (0.9, 1.0))])
def test_resized_crop_boxes_and_pixels_equal_numpy_references(height, width, area):
  rng = np.random.RandomState(height)
  draws = rng.uniform(size=(64, preprocess.CROP_DRAWS)).astype(np.float32)
  if area[0] == 0.9:  # narrow images and big areas: most draws fit nothing, the fallback runs
    draws[::2, :4 * preprocess.CROP_TRIES] = 0.999
  boxes = preprocess.resized_crop_boxes(tf.constant(draws), height, width, area).numpy()
  expected = np.array([reference_box(u.astype(np.float64), height, width, area) for u in draws])
  np.testing.assert_array_equal(boxes.astype(int), expected)
  images = rng.randint(0, 256, (64, height, width, 3)).astype(np.uint8)
  crops = preprocess.resized_crops(tf.constant(images), tf.constant(boxes), (24, 24)).numpy()
  for i in range(0, 64, 9):
    reference = reference_crop(images[i], expected[i], (24, 24))
    assert np.abs(crops[i].astype(int) - reference.astype(int)).max() <= 1, i  # float rounding


def test_center_crop_takes_the_centre_of_the_resized_shorter_side():
  """A 120 x 300 image whose pixel value is its column: resized so the shorter side is 64 / 0.875
  = 73 (then 183 wide), the centre 64 columns are source columns ~(300 - 64 * 300 / 183) / 2 on."""
  image = np.broadcast_to(np.arange(300, dtype=np.float32)[None, :, None] % 256, (120, 300, 1))
  crop = preprocess.central_square(tf.constant(image.astype(np.uint8)), 64, 0.875).numpy()
  assert crop.shape == (64, 64, 1)
  scale = 300 / 183
  first, last = (crop[32, 0, 0] + 0.5), crop[32, -1, 0]
  assert abs(first - ((183 - 64) // 2 + 0.5) * scale) < 2, first
  assert abs(last - (((183 - 64) // 2 + 63 + 0.5) * scale - 0.5)) < 2.5, last


@pytest.mark.parametrize("name,cache", [("cifar10", True), ("cifar10", False),
                                        ("imagenet2012", False)])
def test_inception_crops_flip_and_resume_exactly(data_dir, name, cache):
  """Training batches at 48 x 48 from the stand-ins (cached: one size, cropped per batch; streamed:
  any sizes, cropped per example): the right shape, never the plain resize, exact on resume."""
  c = _config(data_dir, name=name, image_size=48, crop="inception", flip=True, cache=cache,
              normalize="unit")
  batches = data.train_iterator(c, global_batch_size=4, seed=3)
  first = [next(batches) for _ in range(4)]
  assert first[0]["image"].shape == (4, 48, 48, 3) and first[0]["image"].dtype == np.float32
  resumed = next(data.train_iterator(c, global_batch_size=4, seed=3, start_step=3))
  np.testing.assert_array_equal(resumed["image"], first[3]["image"])
  np.testing.assert_array_equal(resumed["label"], first[3]["label"])
  plain = _config(data_dir, name=name, image_size=48, cache=cache, normalize="unit")
  plain_batches = data.train_iterator(plain, global_batch_size=4, seed=3)
  plain_first = [next(plain_batches) for _ in range(4)]
  for a, b in zip(first, plain_first):
    np.testing.assert_array_equal(a["label"], b["label"])  # the crop draws leave the order alone
    assert not np.allclose(a["image"], b["image"])


def test_flip_mirrors_about_half_and_changes_nothing_else(data_dir):
  c = _config(data_dir, name="cifar10", normalize="unit")
  plain = data.train_iterator(c, global_batch_size=8, seed=0)
  c.flip = True
  flipped = data.train_iterator(c, global_batch_size=8, seed=0)
  mirrored = 0
  for _ in range(6):
    a, b = next(plain)["image"], next(flipped)["image"]
    for x, y in zip(a, b):
      same, mirror = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
      assert same or mirror
      mirrored += mirror and not same
  assert 12 <= mirrored <= 36, mirrored  # of 48: a fair coin per position


def test_eval_reads_the_centre_crop_and_bad_crop_settings_are_refused(data_dir):
  c = _config(data_dir, name="imagenet2012", image_size=40, crop="inception", cache=False,
              normalize="unit")
  batches, n = data.eval_iterator(c, global_batch_size=4)
  batch = next(batches())
  assert batch["image"].shape == (4, 40, 40, 3) and n == 2
  # The images are the centre crops of the stand-in's first validation images, not plain resizes.
  import tensorflow_datasets as tfds
  raw = tfds.builder("imagenet2012", data_dir=data_dir).as_dataset(split="validation")
  for image, example in zip(batch["image"], raw.take(4).as_numpy_iterator()):
    expected = np.round(preprocess.central_square(tf.constant(example["image"]), 40, 0.875))
    np.testing.assert_allclose(image, expected / 255.0, atol=1e-6)
  with pytest.raises(Exception, match="data.image_size"):
    data.train_iterator(_config(data_dir, name="cifar10", crop="inception"), global_batch_size=4,
                        seed=0)
  with pytest.raises(Exception, match="cache=False"):
    next(data.train_iterator(_config(data_dir, name="imagenet2012", image_size=40, crop="inception"),
                             global_batch_size=4, seed=0))


# ---- pretrained files under the real names and shapes ---------------------------------------------

def timm_vit_shapes(width, depth, mlp, patch, grid, num_classes):
  """timm VisionTransformer's state dict (class token, learned position embedding), in order."""
  shapes = [("cls_token", (1, 1, width)), ("pos_embed", (1, grid * grid + 1, width)),
            ("patch_embed.proj.weight", (width, 3, patch, patch)), ("patch_embed.proj.bias", (width,))]
  for i in range(depth):
    b = f"blocks.{i}."
    shapes += [(b + "norm1.weight", (width,)), (b + "norm1.bias", (width,)),
               (b + "attn.qkv.weight", (3 * width, width)), (b + "attn.qkv.bias", (3 * width,)),
               (b + "attn.proj.weight", (width, width)), (b + "attn.proj.bias", (width,)),
               (b + "norm2.weight", (width,)), (b + "norm2.bias", (width,)),
               (b + "mlp.fc1.weight", (mlp, width)), (b + "mlp.fc1.bias", (mlp,)),
               (b + "mlp.fc2.weight", (width, mlp)), (b + "mlp.fc2.bias", (width,))]
  return shapes + [("norm.weight", (width,)), ("norm.bias", (width,)),
                   ("head.weight", (num_classes, width)), ("head.bias", (num_classes,))]


def torchvision_resnet_shapes(blocks, bottleneck, num_classes):
  """torchvision ResNet's state dict (BatchNorm statistics included), in order."""
  def bn(name, n):
    return [(f"{name}.weight", (n,)), (f"{name}.bias", (n,)), (f"{name}.running_mean", (n,)),
            (f"{name}.running_var", (n,)), (f"{name}.num_batches_tracked", ())]
  shapes = [("conv1.weight", (64, 3, 7, 7))] + bn("bn1", 64)
  expansion, inplanes = (4 if bottleneck else 1), 64
  for layer, count in enumerate(blocks, start=1):
    planes = 64 * 2 ** (layer - 1)
    for j in range(count):
      b = f"layer{layer}.{j}."
      kernels = ([(inplanes, 1), (planes, 3), (planes, 1)] if bottleneck
                 else [(inplanes, 3), (planes, 3)])
      outs = [planes, planes, planes * expansion] if bottleneck else [planes, planes]
      for k, ((cin, size), cout) in enumerate(zip(kernels, outs), start=1):
        shapes += [(f"{b}conv{k}.weight", (cout, cin, size, size))] + bn(f"{b}bn{k}", cout)
      if j == 0 and (layer > 1 or inplanes != planes * expansion):
        shapes += [(f"{b}downsample.0.weight", (planes * expansion, inplanes, 1, 1))]
        shapes += bn(f"{b}downsample.1", planes * expansion)
      inplanes = planes * expansion
  return shapes + [("fc.weight", (num_classes, inplanes)), ("fc.bias", (num_classes,))]


def _fixture_shapes(name):
  import json
  return [(n, tuple(s)) for n, s in json.loads(str(np.load(os.path.join(FIXTURES, f"{name}.npz"))
                                                   ["state_shapes"]))]


def test_the_hand_written_state_dict_layouts_are_timms_and_torchvisions():
  """The generators above reproduce the state dicts the fixtures recorded from timm and torchvision
  (a small ViT and ResNet-18), so their ViT-B/16 and ResNet-50 files carry the real names."""
  assert timm_vit_shapes(64, 2, 256, 8, 4, 10) == _fixture_shapes("vit")
  assert torchvision_resnet_shapes((2, 2, 2, 2), False, 10) == _fixture_shapes("resnet18")


def _run(entry, *args):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(entry.define_flags, entry.main, [entry.__name__, *args])
  return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def _train_and_evaluate(config, workdir, *overrides):
  common = ("--config.total_steps=2", "--config.batch_size=2", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.mesh.axes=(('data',1),)",
            "--config.optim.warmup_steps=0")
  status, errors = _run(train_entry, f"--config={config}", f"--workdir={workdir}", *common,
                        *overrides)
  assert status == 0, errors
  status, errors = _run(evaluate_entry, f"--workdir={workdir}")
  assert status == 0, errors
  [row] = read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))
  return row


@pytest.mark.slow
@pytest.mark.xdist_group("real_resolution_vit")
def test_vit_base_lora_from_a_timm_file_on_cifar10_at_224(data_dir, tmp_path):
  """ViT-B/16 weights under timm's names (random values), LoRA on cifar10 upsampled to 224: the file
  loads (position embeddings as they are: 14 x 14), only adapters and head train, it evaluates."""
  weights = str(tmp_path / "vit_base_patch16_224.safetensors")
  safetensors.numpy.save_file(recipe.fill(dict(timm_vit_shapes(768, 12, 3072, 16, 14, 1000))),
                              weights)
  config = (f"{CONFIG}:dataset=cifar10,data_dir={data_dir},model=vit_base,weights={weights},"
            "method=lora")
  c = finetune_tfds.get_config(config.split(":", 1)[1])
  assert c.data.image_size == 224 and c.data.normalize == finetune_tfds.NORMS["imagenet"]
  workdir = str(tmp_path / "run")
  row = _train_and_evaluate(config, workdir)
  assert row["step"] == 2 and row["test/num_examples"] == 10
  assert np.isfinite(row["test/loss"])


@pytest.mark.slow
@pytest.mark.xdist_group("real_resolution_resnet")
def test_resnet50_full_bf16_remat_streams_imagenet_at_224(data_dir, tmp_path):
  """ResNet-50 under torchvision's names, full fine-tuning in bfloat16 with rematerialisation on the
  imagenet2012 stand-in (images of varying size, streamed, random-resized crops)."""
  weights = str(tmp_path / "resnet50.safetensors")
  safetensors.numpy.save_file(recipe.fill(dict(torchvision_resnet_shapes((3, 4, 6, 3), True, 1000))),
                              weights)
  config = f"{CONFIG}:dataset=imagenet2012,data_dir={data_dir},model=resnet50,weights={weights}"
  c = finetune_tfds.get_config(config.split(":", 1)[1])
  assert not c.data.cache and c.data.eval_split == "validation" and c.model.num_classes == 1000
  row = _train_and_evaluate(config, str(tmp_path / "run"), "--config.precision=bfloat16",
                            "--config.model.remat=True")
  assert row["step"] == 2 and row["validation/num_examples"] == 6
  assert np.isfinite(row["validation/loss"])


@pytest.mark.parametrize("arg,message", [
    ("dataset=cifar11", "did you mean 'cifar10_1' or 'cifar10'"),
    ("dataset=glue", "no 'image' and 'label' features"),
    ("dataset=cifar10,method=lora", "pass weights=<file or workdir>"),
    ("dataset=cifar10,norm=imagenett", "choose one of imagenet, bit, unit or auto"),
])
def test_finetune_tfds_bad_arguments_name_the_fix(arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    finetune_tfds.get_config(arg)
