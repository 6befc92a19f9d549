"""Host-local train and eval iterators over TFDS datasets (tf.data on the CPU, NumPy out).

Train order. Step s's global batch holds global positions [s*B, (s+1)*B); host h gets rows
[h*b, (h+1)*b) of it (b = B / process_count). How positions map to examples:
  * `cache=True` (default, small sets): the filtered split is decoded once into each host's memory and
    every epoch is a full stateless permutation seeded by (seed, epoch). The global batch does not
    depend on the number of hosts, and resuming at any step costs nothing.
    With `per_class=M` (class-balanced batches) an epoch is instead made of groups of M examples of
    one class: each class's examples in a random order cut into groups of M (a last partial group is
    left out of that epoch), the groups of all classes shuffled; both draws seeded by (seed, epoch).
    A global batch of B (a multiple of M) is B / M whole groups.
  * `cache=False` (large sets, streamed): each host reads its disjoint shard, shuffled per epoch with a
    `shuffle_buffer`-sized buffer seeded by (seed, epoch). Resuming skips up to one epoch of the
    shard's records (read, not decoded), see `_streamed_chunks`.
Crop offsets, random-resized crops and flips are stateless draws keyed by (seed, global position):
exact on resume, and the same whatever the number of hosts. With `data.crop='inception'` the training
images are read at their own resolution and cropped per batch (in memory: the split's images must
share one size) or per example (streamed: any sizes); evaluation reads the centre crop.
"""
import functools
import math
from typing import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from jtl.data import balanced
from jtl.data import config as config_lib
from jtl.data import labelled
from jtl.data import preprocess
from jtl.data import source
from jtl.errors import ConfigError

plain = source.plain

_FOREVER = 2**62
_LOAD_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
# The splits load_in_memory keeps, least recently used dropped first: up to this many bytes (and
# always the newest). Evaluators of one run read many selections of a small set (the contrastive
# table's 28 probes read 9): a count of 4 entries made them decode the same splits again and again.
_LOAD_CACHE_BYTES = 256 * 2**20
_CHUNK_BYTES = 4 << 20
_ALL_CROPS_MAX_BYTES = 256 << 20
_FLOAT_CACHE_MAX_BYTES = 512 << 20
_ORDER_BLOCK = 1 << 14


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(f'process_index={process_index} is not in [0, process_count={process_count}); '
                      'pass jax.process_index() and jax.process_count()')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f'global batch size {global_batch_size} is not a positive multiple of the '
                      f'{process_count} processes; set the batch size to a multiple of {process_count}')
  return global_batch_size // process_count


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their order: the whole point of this module.
  # Our ops are small: splitting each across threads costs more than it saves, and leaves the cores
  # to the training step.
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _decoder(c: ml_collections.ConfigDict, *, train: bool = False) -> Callable[[dict], dict]:
  """Decoding for training (`train`: at the image's own size when the training crop resizes later)
  or for evaluation."""
  builder = source.get_builder(c)
  inception = c.crop == 'inception'
  return preprocess.decoder(builder.info.features['image'],
                            None if inception and train else c.image_size,
                            tuple(source.target_features(builder)),
                            center_crop=c.center_crop if inception else None)


Targets = dict[str, np.ndarray]


def load_in_memory(c: ml_collections.ConfigDict, split: str, *,
                   train: bool = False) -> tuple[np.ndarray, Targets]:
  """The whole filtered split, decoded: (uint8 [M, H, W, C], {feature: [M, ...]}); memoised per
  process. The targets are every numeric feature besides the image (`label`, ...). `train`: decoded
  for the training crop (`_decoder`)."""
  shots = c.shots if split == c.train_split else None
  train = train and c.crop == 'inception'  # (otherwise both decode alike)
  if train and None in source.get_builder(c).info.features['image'].shape[:2]:
    raise ConfigError(f"data.crop='inception' with data.cache=True holds {c.name!r}'s images at "
                      "their own size, which differ; set --config.data.cache=False (streamed)")
  key = (c.name, str(source.get_builder(c).data_dir), split, c.labels, shots,
         c.shots_seed if shots else None, c.image_size, c.crop, c.center_crop, train)
  if key in _LOAD_CACHE:
    _LOAD_CACHE[key] = _LOAD_CACHE.pop(key)  # the most recently used last
    return _LOAD_CACHE[key]
  ds, _ = source.host_examples(c, split, 0, 1)
  ds = ds.map(plain(_decoder(c, train=train)), num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  batches = list(_options(ds).as_numpy_iterator())
  _LOAD_CACHE[key] = (np.concatenate([x['image'] for x in batches]),
                      {k: np.concatenate([x[k] for x in batches])
                       for k in batches[0] if k != 'image'})

  def size(entry):
    return entry[0].nbytes + sum(v.nbytes for v in entry[1].values())
  while len(_LOAD_CACHE) > 1 and sum(map(size, _LOAD_CACHE.values())) > _LOAD_CACHE_BYTES:
    _LOAD_CACHE.pop(next(iter(_LOAD_CACHE)))
  return _LOAD_CACHE[key]


def train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of host-local batches {'image': f32 [b, H, W, C], 'label': i32 [b], ...}
  (every numeric feature of the dataset: `label` and, for multi-label sets, the others).

  Deterministic in (data_config, seed, global_batch_size): starting at `start_step` yields exactly
  the batches an uninterrupted iterator yields from that step on. Each epoch is reshuffled.
  """
  c = source.validate(data_config)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if start_step < 0:
    raise ConfigError(f'start_step={start_step} must be >= 0')
  if c.per_class and global_batch_size % c.per_class:
    raise ConfigError(f"batch_size={global_batch_size} is not a multiple of data.per_class="
                      f"{c.per_class} (whole groups of one class per batch); set --config.batch_size "
                      "or --config.data.per_class")
  image_shape = stored_image_shape(c)
  # tf.data costs ~0.2 ms per element handed to Python, as long as a small model's step. So each
  # element is a chunk of k consecutive steps, computed with vectorised ops, and Python hands out
  # views of it. Every batch is still a function of its step alone, whatever k is.
  k = _steps_per_chunk(local * (int(np.prod(image_shape)) * 4 + 4))
  per_position = functools.partial(
      _per_position, first_position=start_step * global_batch_size,
      global_batch_size=global_batch_size, steps=k,
      columns=slice(process_index * local, (process_index + 1) * local))
  offsets = draws = None
  if c.augment and c.crop_padding > 0:
    offsets = per_position(preprocess.offset_block(seed, c.crop_padding), preprocess.OFFSET_BLOCK)
  inception = c.crop == 'inception'
  if inception or c.flip:
    draws = per_position(preprocess.crop_draws(seed), preprocess.OFFSET_BLOCK)
  to_float = preprocess.normalizer(config_lib.parse_normalize(c.normalize))
  if c.cache:
    ds, offsets_left = _in_memory_chunks(c, seed, per_position, offsets, to_float, draws)
  else:
    # Streamed images may differ in size: each is cropped on its own, before batching.
    example_draws = (per_position(preprocess.crop_draws(seed), preprocess.OFFSET_BLOCK)
                     .unbatch().unbatch() if inception else None)
    ds, offsets_left = _streamed_chunks(c, seed, start_step, local, k, process_index, process_count,
                                        offsets, draws, example_draws)
  crop_per_batch = inception and c.cache

  def finish(chunk: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    images = chunk['image']
    if images.dtype == tf.float32:  # Normalised once, in memory.
      return chunk
    if offsets_left:  # Pixel work per batch: streamed sets, or in-memory sets too big to precrop.
      flat = tf.reshape(images, [k * local, *image_shape])
      offsets = tf.reshape(chunk['offsets'], [k * local, 2])
      flat = preprocess.random_crop(flat, offsets, c.crop_padding)
      images = tf.reshape(flat, images.shape)
    if 'draws' in chunk:  # Random-resized crops of in-memory images, and flips.
      flat = tf.reshape(images, [k * local, *images.shape[2:]])
      position_draws = tf.reshape(chunk['draws'], [k * local, preprocess.CROP_DRAWS])
      if crop_per_batch:
        boxes = preprocess.resized_crop_boxes(position_draws, flat.shape[1], flat.shape[2],
                                              tuple(c.crop_area))
        flat = preprocess.resized_crops(flat, boxes, image_shape[:2])
      if c.flip:
        flat = preprocess.flip_where(flat, position_draws)
      images = tf.reshape(flat, [k, local, *image_shape])
    drop = ('offsets', 'draws')
    return {**{k: v for k, v in chunk.items() if k not in drop}, 'image': to_float(images)}

  ds = ds.map(plain(finish), num_parallel_calls=tf.data.AUTOTUNE)
  return _unchunk(_options(ds.prefetch(2)).as_numpy_iterator())


def _per_position(block_values: Callable[[tf.Tensor], tf.Tensor], block_size: int, *,
                  first_position: int, global_batch_size: int, steps: int,
                  columns: slice) -> tf.data.Dataset:
  """Per-global-position values from `first_position` on, made block by block, as [k, b, ...] chunks.

  `block_values(i)` gives the values of positions [i * block_size, (i + 1) * block_size); each host
  keeps its `columns` of every global batch.
  """
  first_block, offset = divmod(first_position, block_size)
  blocks = tf.data.Dataset.range(first_block, _FOREVER).map(plain(
      lambda block: block_values(block)[tf.where(block == first_block, offset, 0):]))
  blocks = blocks.rebatch(steps * global_batch_size, drop_remainder=True)  # Slices: no per-item cost.
  return blocks.map(plain(
      lambda v: tf.reshape(v, [steps, global_batch_size, *v.shape[1:]])[:, columns]))


def _in_memory_chunks(c: ml_collections.ConfigDict, seed: int,
                      per_position: Callable[..., tf.data.Dataset],
                      offsets: tf.data.Dataset | None,
                      to_float: Callable[[tf.Tensor], tf.Tensor],
                      draws: tf.data.Dataset | None = None) -> tuple[tf.data.Dataset, bool]:
  """Chunks gathered from the decoded split in memory; and whether crops are still to do.

  Small sets are held as normalised float32 (casting per batch costs more than the gather), with
  every crop precomputed when augmenting; others as uint8, finished per chunk.

  Global position p is example order_e[p % M] of epoch e = p // M, order_e a stateless permutation
  seeded by (seed, e). Resuming costs nothing: no record is read or skipped.
  """
  images, targets = load_in_memory(c, c.train_split, train=True)
  if c.label_fraction:
    targets = labelled.hide(targets, c.label_fraction.to_dict(), c.shots_seed)
  key = tf.constant(preprocess.derive_key(seed, preprocess.SHUFFLE), tf.int64)
  if c.per_class:
    epoch_order, size = balanced.epoch_order(targets, c.per_class, key)
  else:
    size = len(images)

    def epoch_order(epoch: tf.Tensor) -> tf.Tensor:
      return tf.random.experimental.stateless_shuffle(
          tf.range(size, dtype=tf.int32), seed=tf.stack([key, epoch]), alg='philox')

  # A tf.data element costs ~50 us here, so small sets make several epochs' orders per element.
  epochs_per_block = int(np.clip(-(-_ORDER_BLOCK // size), 1, 64))

  def block_order(block: tf.Tensor) -> tf.Tensor:
    epochs = block * epochs_per_block + tf.range(epochs_per_block, dtype=tf.int64)
    orders = tf.map_fn(epoch_order, epochs, fn_output_signature=tf.TensorSpec([size], tf.int32))
    return tf.reshape(orders, [-1])

  order = per_position(block_order, size * epochs_per_block)
  width = 2 * c.crop_padding + 1
  # Small sets keep every crop of every image, so augmenting is one gather and no pixel work.
  precropped = offsets is not None and images.nbytes * width**2 <= _ALL_CROPS_MAX_BYTES
  if precropped:
    images = preprocess.all_crops(images, c.crop_padding)
  images = tf.constant(images)
  targets = {k: tf.constant(v) for k, v in targets.items()}
  if ((offsets is None or precropped) and draws is None
      and images.shape.num_elements() * 4 <= _FLOAT_CACHE_MAX_BYTES):
    images = to_float(images)

  def chunk_at(parts: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    order, offsets = parts['order'], parts.get('offsets')
    rows = order * width**2 + offsets[..., 0] * width + offsets[..., 1] if precropped else order
    chunk = {'image': tf.gather(images, rows), **{k: tf.gather(v, order) for k, v in targets.items()}}
    if offsets is not None and not precropped:
      chunk['offsets'] = offsets
    if 'draws' in parts:
      chunk['draws'] = parts['draws']
    return chunk

  parts = {'order': order, **({'offsets': offsets} if offsets is not None else {}),
           **({'draws': draws} if draws is not None else {})}
  ds = tf.data.Dataset.zip(parts)
  crops_left = offsets is not None and not precropped
  return ds.map(plain(chunk_at), num_parallel_calls=tf.data.AUTOTUNE), crops_left


def _streamed_chunks(c: ml_collections.ConfigDict, seed: int, start_step: int, local: int,
                     steps: int, process_index: int, process_count: int,
                     offsets: tf.data.Dataset | None, draws: tf.data.Dataset | None = None,
                     example_draws: tf.data.Dataset | None = None
                     ) -> tuple[tf.data.Dataset, bool]:
  """uint8 chunks read from this host's shard; and whether crops are still to do (yes, if asked).

  Each epoch shuffles the shard with a buffer seeded by (seed, epoch). Resuming starts at the right
  epoch and skips (start_step * b) mod (shard size) records *before* decoding: up to one epoch of the
  shard is read and shuffled again, never decoded or augmented.
  """
  shard, size = source.host_examples(c, c.train_split, process_index, process_count)
  if size == 0:
    raise ConfigError(f'host {process_index} of {process_count} gets no examples of split '
                      f'{c.train_split!r}; use fewer processes or a larger split')
  first_epoch, skip = divmod(start_step * local, size)
  key = preprocess.derive_key(seed, preprocess.SHUFFLE)

  def epoch_examples(epoch: tf.Tensor) -> tf.data.Dataset:
    return shard.shuffle(c.shuffle_buffer, seed=key * 2**20 + epoch, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(plain(epoch_examples)).skip(skip)
  ds = ds.map(plain(_decoder(c, train=True)), num_parallel_calls=tf.data.AUTOTUNE)
  if example_draws is not None:  # random-resized crop of each example at its own size
    size = (c.image_size, c.image_size)
    area = tuple(c.crop_area)

    def crop(example: dict[str, tf.Tensor], position_draws: tf.Tensor) -> dict[str, tf.Tensor]:
      image = example['image']
      box = preprocess.resized_crop_boxes(position_draws[None], tf.shape(image)[0],
                                          tf.shape(image)[1], area)
      return {**example, 'image': preprocess.resized_crops(image[None], box, size)[0]}
    ds = tf.data.Dataset.zip((ds, example_draws)).map(plain(crop),
                                                      num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True).batch(steps, drop_remainder=True)
  extra = {**({'offsets': offsets} if offsets is not None else {}),
           **({'draws': draws} if draws is not None and c.flip else {})}
  if not extra:
    return ds, False
  ds = tf.data.Dataset.zip((ds, extra))
  return ds.map(plain(lambda chunk, extra: {**chunk, **extra})), offsets is not None


def stored_image_shape(c: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(height, width, channels) of the images a batch of (resolved) data config `c` holds."""
  height, width, channels = source.get_builder(c).info.features['image'].shape
  return (c.image_size, c.image_size, channels) if c.image_size else (height, width, channels)


def _steps_per_chunk(batch_bytes: int) -> int:
  """Batches per tf.data element: as many as fit in ~4 MiB, at most 128."""
  return int(np.clip(_CHUNK_BYTES // max(int(batch_bytes), 1), 1, 128))


def _unchunk(chunks: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  for chunk in chunks:
    for i in range(len(chunk['image'])):
      yield {k: v[i] for k, v in chunk.items()}


def eval_iterator(
    data_config: ml_collections.ConfigDict, *, split: str | None = None, global_batch_size: int,
    process_index: int = 0, process_count: int = 1,
) -> tuple[Callable[[], Iterator[dict[str, np.ndarray]]], int]:
  """Returns (factory of a fresh pass, num_batches) over `split` (default: data.eval_split).

  Batches are host-local {'image', 'mask', 'label', ...}; `mask` is 1.0 for real examples and 0.0 for
  padding (zero images and targets). Every example of the filtered split appears exactly once over all
  hosts, host h taking examples h, h + P, ... (or its `even_splits` part when streaming without a
  label filter), and every host yields the same `num_batches`. No shuffling, no augmentation.
  """
  c = source.validate(data_config)
  split = c.eval_split if split is None else split
  source.check_split(source.get_builder(c), c.name, source.records(c, split), 'the eval split')
  local = _local_batch_size(global_batch_size, process_index, process_count)
  to_float = preprocess.normalizer(config_lib.parse_normalize(c.normalize))
  if c.cache:
    images, targets = load_in_memory(c, split)
    sizes = [len(range(i, len(images), process_count)) for i in range(process_count)]
  else:
    sizes = source.host_sizes(c, split, process_count)
  num_batches = max(1, math.ceil(max(sizes) / local))
  size = sizes[process_index]

  if c.cache:
    # One all-zero example appended: padding rows gather it, so they need no special casing.
    def local_rows(x: np.ndarray) -> tf.Tensor:
      return tf.constant(np.concatenate([x[process_index::process_count], np.zeros_like(x[:1])]))
    images = local_rows(images)
    targets = {k: local_rows(v) for k, v in targets.items()}

    def batch_at(k: tf.Tensor) -> dict[str, tf.Tensor]:
      position = k * local + tf.range(local, dtype=tf.int64)
      valid = position < size
      index = tf.where(valid, position, size)
      return {'image': to_float(tf.gather(images, index)),
              **{k: tf.gather(v, index) for k, v in targets.items()},
              'mask': tf.cast(valid, tf.float32)}

    ds = tf.data.Dataset.range(num_batches).map(plain(batch_at),
                                                num_parallel_calls=tf.data.AUTOTUNE)
  else:
    shard, _ = source.host_examples(c, split, process_index, process_count)
    ds = shard.map(plain(_decoder(c)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(plain(lambda ex: {**ex, 'mask': tf.constant(1.0)}))
    pad = _element_zeros(ds)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_batches * local - size))
    ds = ds.batch(local).map(plain(lambda b: {**b, 'image': to_float(b['image'])}))
  ds = _options(ds.prefetch(tf.data.AUTOTUNE))
  return ds.as_numpy_iterator, num_batches


def _element_zeros(ds: tf.data.Dataset) -> dict[str, tf.Tensor]:
  """Zeros shaped like one element of `ds` (its shapes are static: images have a fixed size)."""
  return {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()}
