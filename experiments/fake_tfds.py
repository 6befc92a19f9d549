"""A stand-in for a real TFDS dataset, prepared without network: the real builder's name, version,
config and features, with random content.

  python -m experiments.fake_tfds --name=cifar10 --data_dir=/tmp/tfds_fake
  python -m experiments.fake_tfds --name=imagenet2012 --data_dir=/tmp/tfds_fake \
      --splits=train:64,validation:32 --image_size=256

Then any config reads it as it would read the real one (`--config.data.data_dir=/tmp/tfds_fake`, or
`data_dir=` of finetune_tfds.py): the builder's own code opens the prepared files, so shapes, dtypes,
label counts, split names and the decoding path are the real dataset's. Use it to try a config at its
real resolution on a machine without the data (the tests do); the numbers it gives mean nothing.
Images of datasets whose images vary in size get random sizes around --image_size. Refuses to write
over a dataset already prepared there.
"""
from __future__ import annotations

import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from etils import epath

flags.DEFINE_string("name", None, "TFDS name, optionally with config and version: cifar10, "
                    "imagenette/320px-v2, ...", required=True)
flags.DEFINE_string("data_dir", None, "Where to prepare it (local or gs://).", required=True)
flags.DEFINE_list("splits", ["train:64", "test:32"], "split:examples pairs.")
flags.DEFINE_integer("image_size", 256, "Typical side of images whose size varies.")
flags.DEFINE_integer("seed", 0, "Random content seed.")
FLAGS = flags.FLAGS


def fake_value(feature: tfds.features.FeatureConnector, rng: np.random.RandomState, index: int,
               image_size: int):
  """One random value that `feature` encodes (images, class labels, text, tensors, boxes, dicts)."""
  if isinstance(feature, tfds.features.FeaturesDict):
    return {k: fake_value(f, rng, index, image_size) for k, f in feature.items()}
  if isinstance(feature, tfds.features.ClassLabel):
    return int(rng.randint(feature.num_classes))
  if isinstance(feature, tfds.features.Image):
    height, width, channels = feature.shape
    height = height or int(rng.randint(3 * image_size // 4, 5 * image_size // 4 + 1))
    width = width or int(rng.randint(3 * image_size // 4, 5 * image_size // 4 + 1))
    return rng.randint(0, 256, (height, width, channels or 3)).astype(feature.np_dtype)
  if isinstance(feature, tfds.features.BBoxFeature):
    y, x = np.sort(rng.uniform(size=(2, 2)), axis=1)
    return tfds.features.BBox(ymin=y[0], xmin=x[0], ymax=y[1], xmax=x[1])
  if isinstance(feature, tfds.features.Text):
    return f"fake example {index}"
  if isinstance(feature, tfds.features.Tensor):
    shape = tuple(d if d is not None else 1 for d in feature.shape)
    dtype = np.dtype(feature.np_dtype)
    if dtype == np.bool_:
      return rng.randint(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
      return rng.randint(0, 2, shape).astype(dtype)
    if dtype.kind in "SUO":
      return np.full(shape, f"fake {index}", dtype=object) if shape else f"fake {index}"
    return rng.uniform(size=shape).astype(dtype)
  raise ValueError(f"no random value for a {type(feature).__name__} feature; fake_tfds writes "
                   "images, class labels, text, tensors and boxes")


def write(name: str, data_dir: str, splits: dict[str, int], *, image_size: int = 256,
          seed: int = 0) -> str:
  """Prepares the stand-in of `name` in `data_dir` (a gs:// one: prepared in a local temporary
  folder, then copied up, as for a real dataset); returns the dataset's directory."""
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    raise ValueError(f"{builder.data_dir} already holds a prepared {name}; choose another data_dir")
  if "://" in data_dir:  # TFDS prepares by renaming a folder, which object stores cannot do
    with tempfile.TemporaryDirectory() as local:
      prepared = epath.Path(write(name, local, splits, image_size=image_size, seed=seed))
      target = epath.Path(builder.data_dir)
      for path in prepared.glob("*"):
        target.mkdir(parents=True, exist_ok=True)
        path.copy(target / path.name, overwrite=True)
    return str(target)
  rng = np.random.RandomState(seed)
  features = builder.info.features
  examples = {split: [(i, fake_value(features, rng, i, image_size)) for i in range(n)]
              for split, n in splits.items()}
  config = builder.builder_config.name if builder.builder_config else None
  tfds.dataset_builders.store_as_tfds_dataset(
      name=builder.name, version=builder.version, features=features, split_datasets=examples,
      config=config, data_dir=data_dir,
      description=f"Random stand-in for {builder.name} written by experiments.fake_tfds.")
  return str(tfds.builder(name, data_dir=data_dir).data_dir)


def main(argv):
  del argv
  splits = {}
  for item in FLAGS.splits:
    split, _, count = item.partition(":")
    if not split or not count.isdigit() or int(count) < 1:
      sys.exit(f"error: bad --splits entry {item!r}; write split:examples, e.g. train:64")
    splits[split] = int(count)
  try:
    path = write(FLAGS.name, str(epath.Path(FLAGS.data_dir).absolute())
                 if "://" not in FLAGS.data_dir else FLAGS.data_dir,
                 splits, image_size=FLAGS.image_size, seed=FLAGS.seed)
  except (ValueError, tfds.core.registered.DatasetNotFoundError) as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")
  print(f"wrote a random stand-in for {FLAGS.name} ({', '.join(f'{s}: {n}' for s, n in splits.items())}"
        f" examples) to {path}")


if __name__ == "__main__":
  app.run(main)
