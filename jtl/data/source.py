"""Opening datasets: name and split checks, preparing builders, label filtering and K-shot selection.

An example's *raw index* is its position in the split read in TFDS order (`shuffle_files=False`, one
fixed `ReadConfig`, deterministic interleave), so it is the same in every process and every run.
Label filters and K-shot selections are sets of raw indices, chosen over the whole split before any
host sharding.
"""
import contextlib
import difflib
import fcntl
import functools
import hashlib
import io
import logging
import os
import re
import socket
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from tensorflow_datasets.core.utils import tqdm_utils

from jtl.data import config as config_lib
from jtl.data import digits  # Registers the embedded `sklearn_digits` builder with TFDS.
from jtl.data import attributes  # Registers `digit_attributes`.
from jtl.data import multidigits  # Registers `multi_digits`.
from jtl.data import printed_digits  # Registers `printed_digits`.
from jtl.data import glyphs  # Registers `glyphs`.
from jtl.data import folder  # `folder:<path>`: a user's own images, built offline.
from jtl.errors import ConfigError


def plain(fn):
  """`fn` as a `Dataset.map` function that AutoGraph leaves as it is. jtl's map functions are
  straight-line TensorFlow (no Python `if`/`for` on tensors), and AutoGraph's rewrite of their source
  (parse, transform, recompile, for every function traced) cost about 1 s of every run's start-up."""
  return tf.autograph.experimental.do_not_convert(fn)

# eval_split: the train split's examples that data.shots did not pick (a per-class train/test division
# of one split). Reserved: no dataset's split of that name is read.
REST = 'rest'
# Builders whose data ships inside an installed package: preparing them is offline and takes seconds.
EMBEDDED = (digits.SklearnDigits.name, printed_digits.PrintedDigits.name,
            multidigits.MultiDigits.name, attributes.DigitAttributes.name, glyphs.Glyphs.name,
            folder.NAME)


def _network_reachable(host: str = 'storage.googleapis.com', timeout: float = 3.0) -> bool:
  """Whether TFDS's usual download host answers (a quick check, not a guarantee)."""
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


@functools.lru_cache(maxsize=None)
def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name` (not prepared); ConfigError with close matches for unknown names.

  `name` is `_key(c)`: the dataset name, or for a `folder:` dataset its `folder.builder_key`."""
  if folder.is_folder(name):
    return folder.builder(name, data_dir)
  base = name.split(':')[0].split('/')[0]
  known = tfds.list_builders(with_community_datasets=False)
  if base not in known:
    close = difflib.get_close_matches(base, known, n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ''
    raise ConfigError(f"unknown dataset {name!r}{hint}; set --config.data.name to a TFDS dataset name "
                      f"or {' or '.join(repr(e) for e in EMBEDDED)}")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # Bad version or config name: TFDS's message says which exist.
    raise ConfigError(f'cannot open dataset {name!r}: {_first_line(e)}; fix --config.data.name') from e


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """TFDS's progress bars and its printed "Downloading and preparing ..." lines off, unless absl's
  `--verbosity=1`: the line above says what is happening (and the embedded builders that take long,
  printed digits and glyphs, log how far they got)."""
  if absl_logging.get_verbosity() >= absl_logging.DEBUG:
    yield
    return
  bars = getattr(tqdm_utils, '_active', True)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(bars)


def _prepare(builder: tfds.core.DatasetBuilder, name: str,
             data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Runs `download_and_prepare` once; tolerates another process preparing the same dir meanwhile."""
  if name.split(':')[0].split('/')[0] not in EMBEDDED and not _network_reachable():
    # Without this, TFDS retries each download with back-off for minutes before failing.
    raise ConfigError(f'dataset {name!r} is not prepared in {builder.data_dir} and there is no '
                      f'network to download it; prepare it where there is (`tfds build {name} '
                      '--data_dir=DIR`) and set --config.data.data_dir=DIR')
  with _one_preparer(builder, name):
    _builder.cache_clear()
    builder = _builder(name, data_dir)
    if builder.is_prepared():  # another process prepared it while this one waited for the lock
      return builder
    logging.info('Preparing dataset %s in %s (first use only; later runs read it from there)', name,
                 builder.data_dir)
    return _download_and_prepare(builder, name, data_dir)


@contextlib.contextmanager
def _one_preparer(builder: tfds.core.DatasetBuilder, name: str) -> Iterator[None]:
  """Held while `name` is prepared in a local data dir: processes that start together (a sweep's
  cells, a pytest worker's tests) build an embedded dataset once; the others wait, then read it. An
  fcntl lock, so a killed builder releases it. Data dirs on gs:// (no locks there) go unlocked: a
  lost race there costs a second build, which `_download_and_prepare` tolerates."""
  root = str(builder.data_dir_root)
  try:
    if '://' in root:
      raise OSError('no file locks on a remote file system')
    os.makedirs(root, exist_ok=True)
    lock = open(prepare_lock_path(root, name), 'a')  # pylint: disable=consider-using-with
  except OSError:  # (a read-only data dir: preparing will say what is wrong)
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
    yield


def prepare_lock_path(data_dir_root: str, name: str) -> str:
  """The lock file that `_prepare` holds while it prepares dataset `name` in `data_dir_root`."""
  readable = re.sub(r'[^\w.-]+', '-', name)[:60]  # (a folder dataset's name holds its path)
  return os.path.join(data_dir_root,
                      f'.prepare-{readable}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.lock')


def _download_and_prepare(builder: tfds.core.DatasetBuilder, name: str,
                          data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    with _quiet_tfds():
      builder.download_and_prepare()
  except ConfigError:  # A bad input found while preparing (an unreadable image): say it as it is.
    raise
  except Exception as e:
    _builder.cache_clear()
    builder = _builder(name, data_dir)
    if not builder.is_prepared():  # Not a lost race with a sibling process: a real failure.
      raise ConfigError(f'cannot prepare dataset {name!r} in {builder.data_dir}: {_first_line(e)}; '
                        'build it first (`tfds build`) or set --config.data.data_dir') from e
  _builder.cache_clear()  # Re-open so `info` holds the split sizes just written.
  return _builder(name, data_dir)


def target_features(builder: tfds.core.DatasetBuilder) -> dict[str, tfds.features.FeatureConnector]:
  """The features carried next to the image: every numeric one (class labels, numeric tensors);
  text and other non-numeric features are dropped."""
  out = {}
  for name, feature in builder.info.features.items():
    dtype = getattr(feature, 'np_dtype', None)
    if name == 'image' or dtype is None:
      continue
    if np.issubdtype(np.dtype(dtype), np.number) or np.dtype(dtype) == np.bool_:
      out[name] = feature
  return out


def _has_class_label(features) -> bool:
  return 'label' in features and isinstance(features['label'], tfds.features.ClassLabel)


def _check_features(builder: tfds.core.DatasetBuilder, c: ml_collections.ConfigDict) -> None:
  """Checks features and labels (known from the builder's code: no need to prepare it)."""
  features = builder.info.features
  if 'image' not in features or not isinstance(features['image'], tfds.features.Image):
    raise ConfigError(f"dataset {c.name!r} has no 'image' feature (it has "
                      f'{", ".join(features.keys())}); pick an image dataset')
  if (c.labels is not None or c.shots is not None) and not _has_class_label(features):
    raise ConfigError(f"data.labels and data.shots need a ClassLabel 'label' feature, which "
                      f"{c.name!r} lacks; unset --config.data.labels / --config.data.shots")
  shape = features['image'].shape
  if None in shape[:2] and c.image_size is None:
    raise ConfigError(f'dataset {c.name!r} has images of varying size {shape}; '
                      'set --config.data.image_size')
  for feature in c.label_fraction:
    if feature not in features or not isinstance(features[feature], tfds.features.ClassLabel):
      classes = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
      raise ConfigError(f"data.label_fraction.{feature}: {c.name!r} has no class feature {feature!r} "
                        f"(its class features: {', '.join(classes) or 'none'}); name one of them")
  if c.labels is not None:
    n = features['label'].num_classes
    if max(c.labels) >= n:
      raise ConfigError(f'data.labels={c.labels} has class ids >= {n}, the number of classes of '
                        f'{c.name!r}; set --config.data.labels to ids in 0..{n - 1}')


def _check_splits(builder: tfds.core.DatasetBuilder, c: ml_collections.ConfigDict) -> None:
  """Checks the train and eval splits (known once the builder is prepared)."""
  if c.train_split == REST:
    raise ConfigError(f"train_split={REST!r} names the train split's examples that data.shots did not "
                      "pick, for evaluation; set --config.data.train_split to a split of the dataset")
  for key in ('train_split', 'eval_split'):
    check_split(builder, c.name, records(c, c[key]), f'--config.data.{key}')


def records(c: ml_collections.ConfigDict, split: str) -> str:
  """The TFDS split whose records `split` reads: the train split for `REST`, else `split` itself."""
  if split != REST:
    return split
  if c.shots is None:
    raise ConfigError(f"split {REST!r} is the train split's examples that data.shots did not pick, "
                      "and data.shots is not set; set --config.data.shots or another eval split")
  return c.train_split


def check_split(builder: tfds.core.DatasetBuilder, name: str, split: str, where: str) -> None:
  """ConfigError listing the available splits if `split` is not a valid split string of `builder`."""
  try:
    if not isinstance(split, str):
      raise ValueError(f'a split must be a string, got {type(split).__name__}')
    examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    why = '' if _first_line(e).startswith('Unknown split') else f' ({_first_line(e)})'
    raise ConfigError(f'bad split {split!r} for dataset {name!r}{why}; set {where} to one of '
                      f"{list(builder.info.splits.keys())}, or a slice like 'train[:90%]'") from e
  if not examples:  # (TFDS would fail later, reading: "Instruction [] corresponds to no data!")
    raise ConfigError(f'split {split!r} of dataset {name!r} holds no examples; set {where} to a '
                      "non-empty split or slice, e.g. 'train[:90%]'")


def _key(c: ml_collections.ConfigDict) -> str:
  """What `_builder` opens: the name, plus a folder dataset's held-out fraction (it shapes splits)."""
  return folder.builder_key(c.name, c.folder_test_fraction) if folder.is_folder(c.name) else c.name


def validate(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """All cheap checks (keys, values, name, splits, labels); returns the resolved config.

  Embedded datasets are prepared (seconds, offline) so their splits can be checked; a real TFDS
  dataset that is not prepared yet has its splits checked by `get_builder` after downloading.
  """
  c = config_lib.resolve(data_config)
  builder = _builder(_key(c), c.data_dir)
  _check_features(builder, c)
  if not builder.is_prepared() and c.name.split(':')[0].split('/')[0] in EMBEDDED:
    builder = _prepare(builder, _key(c), c.data_dir)
  if builder.is_prepared():
    _check_splits(builder, c)
  return c


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Validates `data_config` and returns its prepared TFDS builder (preparing it if needed).

  Only datasets that are not prepared yet are downloaded and prepared: prepared ones are reused as is.
  """
  c = validate(data_config)
  builder = _builder(_key(c), c.data_dir)
  if not builder.is_prepared():
    builder = _prepare(builder, _key(c), c.data_dir)
    _check_splits(builder, c)
  return builder


def read(builder: tfds.core.DatasetBuilder, split: str | tfds.typing.SplitArg) -> tf.data.Dataset:
  """Examples of `split` in raw-index order, images still encoded (decoded later, after skipping)."""
  return builder.as_dataset(
      split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))  # We cache ourselves, after filtering.


@functools.lru_cache(maxsize=16)
def _raw_labels(name: str, data_dir: str | None, split: str) -> np.ndarray:
  """Labels of every example of `split` by raw index: one pass over the records, images undecoded."""
  ds = read(_builder(name, data_dir), split)
  ds = ds.map(plain(lambda ex: ex['label']), num_parallel_calls=tf.data.AUTOTUNE)
  return np.concatenate([np.zeros([0], np.int64)] + list(ds.batch(65536).as_numpy_iterator()))


def label_table(c: ml_collections.ConfigDict, num_dataset_classes: int) -> np.ndarray:
  """Maps dataset class id -> remapped id (position in `labels`), or -1 for dropped classes."""
  if c.labels is None:
    return np.arange(num_dataset_classes, dtype=np.int32)
  table = np.full([num_dataset_classes], -1, np.int32)
  table[list(c.labels)] = np.arange(len(c.labels), dtype=np.int32)
  return table


def num_classes(data_config: ml_collections.ConfigDict, split: str | None = None) -> int:
  """len(labels) if `labels` is set, else the dataset's ClassLabel num_classes; with `split`, a
  builder that knows its splits' labels are a prefix of the classes (`split_label_bound`, e.g.
  glyphs: the train split holds the background characters only) gives that split's bound."""
  c = validate(data_config)
  if c.labels is not None:
    return len(c.labels)
  builder = _builder(_key(c), c.data_dir)
  features = builder.info.features  # Known without preparing.
  if not _has_class_label(features):
    raise ConfigError(f"dataset {c.name!r} has no ClassLabel 'label' feature to count classes of")
  if split is not None and hasattr(builder, 'split_label_bound'):
    return builder.split_label_bound(split.split('[')[0])
  return features['label'].num_classes


def selected_indices(c: ml_collections.ConfigDict, split: str) -> np.ndarray | None:
  """Sorted raw indices kept by the label filter and, for the train split, K-shot; None = all kept.
  `REST` (as the eval split): the train split's label-filtered indices that K-shot did not pick.

  Costs one pass over the split's records the first time (cached per process) when `labels` or `shots`
  is set; none otherwise.
  """
  rest = split == REST
  use_shots = c.shots is not None and (split == c.train_split or rest)
  if c.labels is None and not use_shots:
    return None
  builder = get_builder(c)
  table = label_table(c, builder.info.features['label'].num_classes)
  split = records(c, split)
  remapped = table[_raw_labels(_key(c), c.data_dir, split)]
  keep = np.flatnonzero(remapped >= 0)
  if use_shots:
    rng = np.random.default_rng(c.shots_seed)
    chosen = []
    # Every selected class; without a label filter, every class the split holds (glyphs' train split
    # holds the background characters only).
    wanted = range(int(table.max()) + 1) if c.labels is not None else np.unique(remapped[keep])
    for label in wanted:
      pool = keep[remapped[keep] == label]
      if len(pool) < c.shots:
        name = label if c.labels is None else f'{c.labels[label]} (remapped to {label})'
        raise ConfigError(f'class {name} has only {len(pool)} examples in split {split!r} but '
                          f'data.shots={c.shots}; lower --config.data.shots')
      chosen.append(rng.choice(pool, size=c.shots, replace=False))
    chosen = np.sort(np.concatenate(chosen))
    keep = np.setdiff1d(keep, chosen) if rest else chosen
  if not len(keep) and rest:
    raise ConfigError(f"split {REST!r} holds no examples: data.shots={c.shots} picks every example of "
                      f"the train split {split!r}; lower --config.data.shots")
  if not len(keep):
    raise ConfigError(f'split {split!r} of {c.name!r} has no examples of classes {c.labels}; '
                      'fix --config.data.labels')
  return keep


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` after the label filter, and after K-shot when `split` is the train split."""
  c = validate(data_config)
  builder = get_builder(c)
  check_split(builder, c.name, records(c, split), 'the split')
  keep = selected_indices(c, split)
  return len(keep) if keep is not None else builder.info.splits[split].num_examples


def host_sizes(c: ml_collections.ConfigDict, split: str, process_count: int) -> list[int]:
  """Number of examples `host_examples` gives each host."""
  keep = selected_indices(c, split)
  if keep is not None:
    return [len(range(i, len(keep), process_count)) for i in range(process_count)]
  splits = get_builder(c).info.splits
  parts = tfds.even_splits(split, n=process_count, drop_remainder=False)
  return [splits[part].num_examples for part in parts]


def host_examples(c: ml_collections.ConfigDict, split: str, process_index: int,
                  process_count: int) -> tuple[tf.data.Dataset, int]:
  """This host's disjoint share of the (filtered) split, encoded, labels remapped; and its size.

  Without a filter each host reads only its `tfds.even_splits` part; with one, every host reads the
  split's records (cheap: images stay encoded) and keeps every `process_count`-th selected example.
  """
  builder = get_builder(c)
  keep = selected_indices(c, split)
  if keep is None:
    part = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds, size = read(builder, part), builder.info.splits[part].num_examples
  else:
    is_kept = np.zeros([int(keep[-1]) + 1], bool)
    is_kept[keep] = True
    is_kept = tf.constant(is_kept)
    ds = read(builder, records(c, split)).enumerate().take(len(is_kept))
    ds = ds.filter(plain(lambda index, _: tf.gather(is_kept, index)))
    ds = ds.map(plain(lambda _, example: example))
    ds = ds.shard(process_count, process_index)
    size = len(range(process_index, len(keep), process_count))
  names = list(target_features(builder))
  if not _has_class_label(builder.info.features):
    return ds.map(plain(lambda ex: {'image': ex['image'], **{k: ex[k] for k in names}})), size
  table = tf.constant(label_table(c, builder.info.features['label'].num_classes))
  return ds.map(plain(lambda ex: {'image': ex['image'], **{k: ex[k] for k in names},
                                  'label': tf.gather(table, ex['label'])})), size
