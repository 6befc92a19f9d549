"""A user's own image folder (jtl/data/folder.py, `data.name = "folder:<path>"`) through the CLI."""
import contextlib
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from experiments import cli
from experiments import evaluate as evaluate_entry
from experiments import train as train_entry
from jtl import config as config_lib
from jtl import checkpoint, data, objectives
from jtl.data import folder
from jtl.metric_writer import read_jsonl
from tests.helpers import hand_split_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER_CONFIG = os.path.join(ROOT, "experiments/configs/finetune_folder.py")
SMALL = ("--config.total_steps=4", "--config.batch_size=8", "--config.checkpoint_every=4",
         "--config.log_every=2", "--config.optim.warmup_steps=0", "--config.model.widths=(4,8)",
         "--config.mesh.axes=(('data',1),)")


def run(entry, *args):
  """Runs an entry point in-process; returns (exit status, the `error:` lines it printed)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.execute(entry.define_flags, entry.main, [entry.__name__, *args])
  return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def make_images(root, classes=("circle", "cross", "square"), per_class=4, sizes=None, gray=False,
                formats=(".png",)):
  """Class folders of drawn shapes (one shape per class), sizes cycling through `sizes`."""
  sizes = sizes or [(8, 8)]
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      h, w = sizes[(c + i) % len(sizes)]
      yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
      shape = [(yy - .5) ** 2 + (xx - .5) ** 2 < .1, abs(yy - xx) < .15, abs(yy - .5) < .3][c % 3]
      pixels = (shape * 200 + i * 10).astype(np.uint8)
      image = Image.fromarray(pixels if gray else np.stack([pixels, pixels // 2, 255 - pixels], -1))
      image.save(os.path.join(root, name, f"{i}{formats[i % len(formats)]}"))


def test_own_images_train_and_evaluate_from_the_cli_with_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  make_images("imgs", sizes=[(8, 8), (12, 9), (6, 10)], formats=(".png", ".jpg", ".bmp", ".gif"))
  status, errors = run(train_entry, f"--config={FOLDER_CONFIG}:path=imgs", "--workdir=runs/mine",
                       "--config.data.image_size=8", *SMALL)
  assert status == 0, errors
  config = config_lib.load_run_config("runs/mine")
  assert config.data.name == "folder:" + str(tmp_path / "imgs")  # resolved at the boundary
  assert config.model.num_classes == 3
  assert run(evaluate_entry, "--workdir=runs/mine")[0] == 0
  rows = read_jsonl(tmp_path / "runs/mine/eval_metrics.jsonl")
  assert [r["step"] for r in rows] == [4]
  # The evaluation equals the model's own logits on the three test images, by hand.
  _, variables = checkpoint.load_variables(tmp_path / "runs/mine")
  loss, accuracy, n = hand_split_metrics(
      objectives.build(config).model, {"params": variables["params"], **variables.get("model_state", {})},
      config.data, "test")
  assert rows[0]["test/num_examples"] == n == 3
  assert rows[0]["test/accuracy"] == pytest.approx(accuracy, abs=1e-6)
  assert rows[0]["test/loss"] == pytest.approx(loss, rel=1e-5)
  # 4 images per class, held-out fraction 0.2: one test image per class.
  assert (data.num_examples(config.data, "train"), data.num_examples(config.data, "test")) == (9, 3)


def bad_folder(kind, root):
  """A folder with one problem; returns the part of the path the error must name."""
  if kind == "missing":
    return root
  os.makedirs(root)
  if kind == "empty":
    return root
  make_images(root, classes=("a", "b"), sizes=[(8, 8), (9, 9)] if kind == "sizes" else None)
  if kind == "no_images":
    os.makedirs(os.path.join(root, "c"))
    open(os.path.join(root, "c", "notes.txt"), "w").write("not an image")
    return os.path.join(root, "c")
  if kind == "unreadable":
    open(os.path.join(root, "a", "broken.png"), "wb").write(b"not a png at all")
    return os.path.join(root, "a", "broken.png")
  if kind == "truncated":  # the header reads, the pixels do not
    path = os.path.join(root, "b", "big.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)).save(path)
    open(path, "r+b").truncate(120)
    return path
  return "varying size"


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images", "unreadable", "truncated",
                                  "sizes"])
def test_bad_folders_are_one_line_errors_naming_the_path(tmp_path, kind):
  root = str(tmp_path / "imgs")
  expected = bad_folder(kind, root)
  work = tmp_path / "run"
  status, errors = run(train_entry, f"--config={FOLDER_CONFIG}:path={root}", f"--workdir={work}",
                       *SMALL)
  assert status == 2 and len(errors) == 1, (status, errors)
  assert expected in errors[0], errors[0]
  assert not work.exists()


def test_split_folders_grayscale_and_a_rebuild_when_the_folder_changes(tmp_path):
  root = tmp_path / "imgs"
  make_images(str(root / "train"), classes=("b_dog", "a_cat"), per_class=3, gray=True)
  make_images(str(root / "test"), classes=("a_cat",), per_class=2, gray=True)
  builder = folder.builder(folder.PREFIX + str(root), str(tmp_path / "tfds"))
  builder.download_and_prepare()
  features = builder.info.features
  assert features["image"].shape == (8, 8, 1)  # one size, all grayscale: fixed shape, 1 channel
  assert features["label"].names == ["a_cat", "b_dog"]  # sorted folder names
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6, "test": 2}
  pixels = np.asarray(Image.open(root / "test/a_cat/1.png"))[..., None]
  stored = {int(x["label"]): x["image"] for x in builder.as_dataset(split="test").as_numpy_iterator()
            if np.array_equal(x["image"], pixels)}
  assert list(stored) == [0]  # lossless, labelled by its folder
  again = folder.builder(folder.PREFIX + str(root), str(tmp_path / "tfds"))
  assert again.builder_config.name == builder.builder_config.name and again.is_prepared()
  os.utime(root / "train/b_dog/0.png", ns=(1, 1))  # touched: another folder state
  touched = folder.builder(folder.PREFIX + str(root), str(tmp_path / "tfds"))
  assert touched.builder_config.name != builder.builder_config.name and not touched.is_prepared()
  make_images(str(root / "train"), classes=("c_eel",), per_class=2, gray=False)  # a class, RGB
  grown = folder.builder(folder.PREFIX + str(root), str(tmp_path / "tfds"))
  grown.download_and_prepare()
  assert grown.info.features["label"].names == ["a_cat", "b_dog", "c_eel"]
  assert grown.info.features["image"].shape == (8, 8, 3)
  assert grown.info.splits["train"].num_examples == 8


def test_held_out_split_is_deterministic_stratified_and_stable(tmp_path):
  root = str(tmp_path / "imgs")
  make_images(root, classes=("a", "b"), per_class=10)
  first, second = folder.scan(root, 0.3), folder.scan(root, 0.3)
  assert first.splits == second.splits and first.fingerprint == second.fingerprint
  test = first.splits["test"]
  assert sorted(label for _, label in test) == [0, 0, 0, 1, 1, 1]  # round(0.3 * 10) per class
  assert not {f for f, _ in test} & {f for f, _ in first.splits["train"]}
  shutil.copy(os.path.join(root, "a", "0.png"), os.path.join(root, "a", "new.png"))  # one more in a
  grown = folder.scan(root, 0.3)
  assert [t for t in grown.splits["test"] if t[1] == 1] == [t for t in test if t[1] == 1]
  assert grown.fingerprint != first.fingerprint
