"""Tests for jtl.data: the offline digits builder, filtering, K-shot, resume, multi-host and eval."""
import collections
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jtl import data
from jtl.data import pipeline
from jtl.errors import ConfigError


def _config(**overrides):
  c = data.default_data_config()
  c.update(overrides)
  return c


def _keys(images: np.ndarray) -> list[bytes]:
  """One key per example: its uint8 pixels (every digits image is distinct)."""
  return [x.tobytes() for x in np.round(images * 255).astype(np.uint8)]


@pytest.fixture(scope='module')
def raw():
  """{split: {image bytes: original label}} straight from TFDS."""
  builder = data.get_builder(_config())
  out = {}
  for split in ('train', 'test'):
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    out[split] = {ex['image'].tobytes(): int(ex['label']) for ex in examples}
  return out


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _eval_keys(c, split=None, batch=32, process_count=1):
  """(keys of the real examples over all hosts, labels, num_batches per host)."""
  keys, labels, counts = [], [], set()
  for host in range(process_count):
    factory, num_batches = data.eval_iterator(c, split=split, global_batch_size=batch,
                                              process_index=host, process_count=process_count)
    batches = list(factory())
    assert len(batches) == num_batches
    counts.add(num_batches)
    for b in batches:
      assert b['mask'].dtype == np.float32 and set(np.unique(b['mask'])) <= {0.0, 1.0}
      real = b['mask'] > 0
      assert b['image'].shape[0] == batch // process_count and not b['image'][~real].any()
      keys += _keys(b['image'][real])
      labels += list(b['label'][real])
  assert len(counts) == 1  # Every host runs the same number of eval steps.
  return keys, labels, counts.pop()


def test_builder_builds_offline(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('the embedded builder must not download')
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', no_network)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract', no_network)
  builder = data.get_builder(_config(data_dir=str(tmp_path)))
  assert builder.is_prepared() and str(builder.data_dir).startswith(str(tmp_path))
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 1438, 'test': 359} and sum(sizes.values()) == 1797
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split='test'))))
  assert ex['image'].shape == (8, 8, 1) and ex['image'].dtype == np.uint8
  assert data.num_classes(_config()) == 10


def test_splits_stratified_and_complete(raw):
  train, test = (collections.Counter(raw[split].values()) for split in ('train', 'test'))
  assert sorted(train) == sorted(test) == list(range(10))
  assert all(0.18 < test[k] / (train[k] + test[k]) < 0.22 for k in range(10))
  assert len(raw['train']) + len(raw['test']) == 1797 and not raw['train'].keys() & raw['test'].keys()
  pixels = np.frombuffer(b''.join(raw['train']), np.uint8)
  assert pixels.max() == 255 and set(np.unique(pixels)) <= {round(v * 255 / 16) for v in range(17)}


def test_train_batches_shapes_and_values():
  batch = next(data.train_iterator(_config(), global_batch_size=64, seed=0))
  assert batch['image'].shape == (64, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1 and batch['label'].max() <= 9
  resized = next(data.train_iterator(_config(image_size=16, normalize=((0.5,), (0.25,))),
                                     global_batch_size=8, seed=0))
  assert resized['image'].shape == (8, 16, 16, 1)
  assert -2 <= resized['image'].min() < -1.9 and resized['image'].max() <= 2


def test_label_filter_remaps_in_order(raw):
  c = _config(labels=(5, 6, 7, 8, 9))
  assert data.num_classes(c) == 5
  assert data.num_examples(c, 'test') == sum(v >= 5 for v in raw['test'].values())
  keys, labels, _ = _eval_keys(c)
  assert len(keys) == data.num_examples(c, 'test')
  assert all(raw['test'][k] == 5 + label for k, label in zip(keys, labels))
  batch = next(data.train_iterator(c, global_batch_size=128, seed=0))
  assert all(raw['train'][k] == 5 + label for k, label in zip(_keys(batch['image']), batch['label']))
  reordered = _eval_keys(_config(labels=(9, 3)))  # Order given is the new order: 9 -> 0, 3 -> 1.
  assert all(raw['test'][k] == (9, 3)[label] for k, label in zip(reordered[0], reordered[1]))


def test_kshot_selection(raw):
  c = _config(shots=4, shots_seed=0)
  assert data.num_examples(c, 'train') == 40
  assert data.num_examples(c, 'test') == len(raw['test'])  # K-shot touches the train split only.
  keys, labels, _ = _eval_keys(c, split='train')
  assert collections.Counter(labels) == {k: 4 for k in range(10)}
  assert all(raw['train'][k] == label for k, label in zip(keys, labels))
  pipeline._LOAD_CACHE.clear()  # Select again from scratch, not from the in-memory cache.
  assert keys == _eval_keys(_config(shots=4, shots_seed=0), split='train')[0]
  assert set(keys) != set(_eval_keys(_config(shots=4, shots_seed=1), split='train')[0])
  # The first epoch of training is exactly the selection, each example once.
  first_epoch = next(data.train_iterator(c, global_batch_size=40, seed=3))
  assert sorted(_keys(first_epoch['image'])) == sorted(keys)
  filtered = _eval_keys(_config(labels=(1, 7), shots=3), split='train')
  assert collections.Counter(filtered[1]) == {0: 3, 1: 3}


def test_in_memory_splits_are_kept_by_bytes_least_recently_used_first(monkeypatch):
  """load_in_memory decodes a selection once while it fits the byte budget (the contrastive
  table's evaluators read 9 selections, 56 times), and drops the least recently used beyond it."""
  decoded = []
  host_examples = pipeline.source.host_examples
  monkeypatch.setattr(pipeline.source, 'host_examples',
                      lambda c, split, *a: decoded.append((c.shots_seed, split))
                      or host_examples(c, split, *a))
  pipeline._LOAD_CACHE.clear()
  configs = [_config(shots=1, shots_seed=seed) for seed in range(6)]
  first = [pipeline.load_in_memory(c, 'train')[0] for c in configs]
  assert [pipeline.load_in_memory(c, 'train')[0] is x for c, x in zip(configs, first)] == [True] * 6
  assert decoded == [(seed, 'train') for seed in range(6)]  # each decoded once
  images, targets = next(iter(pipeline._LOAD_CACHE.values()))
  one = images.nbytes + sum(v.nbytes for v in targets.values())  # 10 examples; 2 shots: 20
  monkeypatch.setattr(pipeline, '_LOAD_CACHE_BYTES', 3 * one)
  pipeline.load_in_memory(configs[4], 'train')  # used: seed 5 is now the least recent
  pipeline.load_in_memory(_config(shots=2, shots_seed=0), 'train')  # a new, larger one: seeds go
  assert [key[5] for key in pipeline._LOAD_CACHE] == [4, 0]  # shots_seed 4, then the newest
  pipeline._LOAD_CACHE.clear()


@pytest.mark.parametrize('cache', [True, False])
@pytest.mark.parametrize('augment', [False, True])
def test_resume_is_exact(cache, augment):
  # 50 examples, so epochs are short. Streaming tests use a slice: with a label filter or K-shot every
  # streamed epoch reads the whole split to find its examples.
  small = {'shots': 5} if cache else {'train_split': 'train[:50]'}
  c = _config(augment=augment, cache=cache, shuffle_buffer=64, **small)
  fresh = _take(data.train_iterator(c, global_batch_size=16, seed=7), 12)
  for start in (1, 7):  # Step 7 starts mid-way through epoch 2.
    resumed = _take(data.train_iterator(c, global_batch_size=16, seed=7, start_step=start), 12 - start)
    for a, b in zip(fresh[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = next(data.train_iterator(c, global_batch_size=16, seed=8))
  assert not np.array_equal(other_seed['image'], fresh[0]['image'])


@pytest.mark.parametrize('cache', [True, False])
def test_epochs_are_reshuffled_permutations(cache):
  c = _config(cache=cache, **({'shots': 5} if cache else {'train_split': 'train[:50]'}))
  epochs = _take(data.train_iterator(c, global_batch_size=50, seed=0), 2)
  first, second = (_keys(e['image']) for e in epochs)
  assert sorted(first) == sorted(second) and len(set(first)) == 50 and first != second


def test_augment_crops_with_zero_padding():
  c = _config(shots=5)
  plain = next(data.train_iterator(c, global_batch_size=50, seed=0))
  crops = next(data.train_iterator(_config(shots=5, augment=True), global_batch_size=50, seed=0))
  np.testing.assert_array_equal(plain['label'], crops['label'])  # Same order, only pixels move.
  padded = np.pad(plain['image'], [(0, 0), (1, 1), (1, 1), (0, 0)])
  shifted = 0
  for x, y in zip(padded, crops['image']):
    offsets = [(i, j) for i in range(3) for j in range(3) if np.array_equal(x[i:i + 8, j:j + 8], y)]
    assert offsets, 'each augmented image is a 1-pixel-padded crop of the original'
    shifted += (1, 1) not in offsets
  assert shifted > 10


@pytest.mark.parametrize('cache, small', [(True, {'shots': 5}), (False, {'shots': 5}),
                                          (False, {'train_split': 'train[:50]'})])
def test_multihost_slices_are_disjoint_and_complete(cache, small):
  c = _config(cache=cache, **small)  # 50 examples: 5 global steps of 10 are one epoch.
  selection = set(_eval_keys(c, split=c.train_split)[0])
  hosts = [_take(data.train_iterator(c, global_batch_size=10, seed=1, process_index=i,
                                     process_count=2), 5) for i in range(2)]
  per_host = [[k for b in batches for k in _keys(b['image'])] for batches in hosts]
  assert all(len(set(keys)) == 25 for keys in per_host) and not set(per_host[0]) & set(per_host[1])
  assert set(per_host[0]) | set(per_host[1]) == selection


@pytest.mark.parametrize('augment', [False, True])
def test_small_and_large_in_memory_paths_agree(monkeypatch, augment):
  """Small sets are held normalised with every crop precomputed; big ones finish per batch."""
  c = _config(augment=augment, crop_padding=2, normalize=((0.3,), (0.7,)))
  fast = _take(data.train_iterator(c, global_batch_size=32, seed=5, start_step=3), 2)
  monkeypatch.setattr(pipeline, '_ALL_CROPS_MAX_BYTES', 0)
  monkeypatch.setattr(pipeline, '_FLOAT_CACHE_MAX_BYTES', 0)
  slow = _take(data.train_iterator(c, global_batch_size=32, seed=5, start_step=3), 2)
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_global_batch_does_not_depend_on_host_count():
  """In memory, host h's batch is rows [h*b, (h+1)*b) of the single-host global batch, crops included."""
  c = _config(augment=True)
  single = _take(data.train_iterator(c, global_batch_size=32, seed=1, start_step=40), 3)
  hosts = [_take(data.train_iterator(c, global_batch_size=32, seed=1, start_step=40, process_index=i,
                                     process_count=4), 3) for i in range(4)]
  for step in range(3):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), single[step][key])


def test_class_balanced_batches_are_whole_groups_of_one_class(raw):
  """data.per_class=M: every M consecutive training examples are one class; an epoch is every class's
  floor(n_c / M) groups, no example twice; resume, other hosts and the next epoch behave as above."""
  c = _config(per_class=4, shots=10)  # 10 examples per class: 2 groups of 4 each, 2 left out
  per_epoch = 10 * 2 * 4
  batches = _take(data.train_iterator(c, global_batch_size=8, seed=3), 2 * per_epoch // 8)
  labels = np.concatenate([b['label'] for b in batches])
  groups = labels.reshape(-1, 4)
  assert (groups == groups[:, :1]).all()
  for epoch in (slice(0, per_epoch), slice(per_epoch, 2 * per_epoch)):
    keys = [k for b in batches for k in _keys(b['image'])][epoch]
    assert len(set(keys)) == per_epoch  # no example twice within an epoch
    assert collections.Counter(raw['train'][k] for k in keys) == {d: 8 for d in range(10)}
    assert collections.Counter(labels[epoch]) == {d: 8 for d in range(10)}
  # The groups come in a random class order, and the next epoch draws again.
  assert len(set(groups[:, 0][:10].tolist())) > 3
  assert not np.array_equal(labels[:per_epoch], labels[per_epoch:])
  resumed = _take(data.train_iterator(c, global_batch_size=8, seed=3, start_step=7), 3)
  hosts = [_take(data.train_iterator(c, global_batch_size=8, seed=3, start_step=7, process_index=i,
                                     process_count=2), 3) for i in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(resumed[step]['image'], batches[7 + step]['image'])
    np.testing.assert_array_equal(np.concatenate([h[step]['label'] for h in hosts]),
                                  batches[7 + step]['label'])


@pytest.mark.parametrize('overrides, batch, expected', [
    ({'per_class': 1}, 8, '--config.data.per_class'),
    ({'per_class': 3}, 8, 'not a multiple of data.per_class=3'),
    ({'per_class': 4, 'cache': False}, 8, '--config.data.cache=True'),
    ({'per_class': 40, 'shots': 10}, 40, 'no class has that many'),
])
def test_class_balanced_batches_refuse_what_they_cannot_do(overrides, batch, expected):
  with pytest.raises(ConfigError) as info:
    next(data.train_iterator(_config(**overrides), global_batch_size=batch, seed=0))
  assert expected in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('cache', [True, False])
def test_the_rest_split_is_every_train_example_k_shot_did_not_pick(raw, cache):
  """eval_split='rest': the train split's examples outside the K-shot selection, each once: with the
  K-shot examples, exactly the train split (a per-class train/test division of one split)."""
  c = _config(shots=10, shots_seed=2, eval_split='rest', cache=cache)
  picked = [k for b in _take(data.train_iterator(c, global_batch_size=100, seed=0), 1)
            for k in _keys(b['image'])]
  rest, labels, _ = _eval_keys(c, batch=64, process_count=2)
  assert len(set(picked)) == 100 and len(rest) == len(set(rest)) == data.num_examples(c, 'rest')
  assert not set(picked) & set(rest) and set(picked) | set(rest) == set(raw['train'])
  assert [raw['train'][k] for k in rest] == labels
  assert collections.Counter(labels) == {d: n - 10 for d, n in collections.Counter(
      raw['train'].values()).items()}


@pytest.mark.parametrize('overrides, expected', [
    ({'eval_split': 'rest'}, 'and data.shots is not set; set --config.data.shots'),
    ({'train_split': 'rest', 'shots': 5}, 'set --config.data.train_split to a split of the dataset'),
])
def test_the_rest_split_needs_shots_and_is_not_for_training(overrides, expected):
  with pytest.raises(ConfigError) as info:
    data.num_examples(_config(**overrides), 'train')
  assert expected in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('cache', [True, False])
@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_every_example_once(raw, cache, process_count):
  c = _config(cache=cache)
  keys, labels, num_batches = _eval_keys(c, batch=12 * process_count, process_count=process_count)
  assert len(keys) == data.num_examples(c, 'test') == 359
  assert sorted(keys) == sorted(raw['test']) and [raw['test'][k] for k in keys] == labels
  assert num_batches == -(-max(len(range(i, 359, process_count)) for i in range(process_count)) // 12)


def test_eval_on_a_slice():
  c = _config(eval_split='test[:50%]')
  assert data.num_examples(c, 'test[:50%]') == len(_eval_keys(c)[0]) == 180
  assert data.num_examples(c, 'train[:90%]') == len(_eval_keys(c, split='train[:90%]')[0])


@pytest.mark.parametrize('overrides, expected', [
    ({'name': 'mnistt'}, "did you mean 'mnist'"),
    ({'train_split': 'trian'}, "['train', 'test']"),
    ({'eval_split': 'test[:200%]'}, '--config.data.eval_split'),
    ({'labels': (3, 10)}, '0..9'),
    ({'shots': 0}, '--config.data.shots'),
    ({'shots': 200}, 'lower --config.data.shots'),
    ({'normalize': 'imagenet'}, "'unit'"),
    ({'shot': 5}, "did you mean 'shots'"),
])
def test_bad_config_raises_one_line(overrides, expected):
  c = dict(_config().items(), **overrides)
  with pytest.raises(ConfigError) as info:
    data.num_examples(c, c.get('train_split', 'train'))
    next(data.train_iterator(c, global_batch_size=8, seed=0))
  message = str(info.value)
  assert expected in message and '\n' not in message


def test_bad_batch_size_and_split_argument():
  with pytest.raises(ConfigError, match='multiple of 3'):
    data.train_iterator(_config(), global_batch_size=16, seed=0, process_count=3)
  with pytest.raises(ConfigError, match='bad split'):
    data.eval_iterator(_config(), split='validation', global_batch_size=8)


def test_deterministic_across_processes():
  """A fresh interpreter (new hash seed, new TF runtime) yields the same batches, cached or streamed."""
  code = """
import hashlib
from jtl import data
for overrides in {cases}:
  c = data.default_data_config()
  c.update(augment=True, **overrides)
  it = data.train_iterator(c, global_batch_size=16, seed=3, start_step=2)
  print(hashlib.sha256(b''.join(next(it)['image'].tobytes() for _ in range(4))).hexdigest())
"""
  cases = [{'cache': True, 'train_split': 'train[:40]'}, {'cache': False, 'train_split': 'train[:40]'},
           {'labels': (2, 4, 6), 'shots': 3, 'shots_seed': 1}]
  code = code.replace('{cases}', repr(cases))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONHASHSEED='123')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=root, check=True,
                       capture_output=True, text=True).stdout.split()[-len(cases):]
  for overrides, digest in zip(cases, out):
    it = data.train_iterator(_config(augment=True, **overrides), global_batch_size=16, seed=3,
                             start_step=2)
    images = b''.join(next(it)['image'].tobytes() for _ in range(4))
    assert hashlib.sha256(images).hexdigest() == digest


def test_a_second_process_waits_for_the_first_to_prepare_the_same_dataset(tmp_path):
  """Processes that start together (a sweep's cells, test workers) build an embedded dataset once:
  while one holds the prepare lock, another that needs the dataset waits, then reads what it built."""
  import fcntl
  from jtl.data import source
  name, data_dir = 'multi_digits', str(tmp_path / 'tfds')
  child = subprocess.Popen([sys.executable, '-c', f"""
from jtl import data
from jtl.data import source
built = []
original = source._download_and_prepare
source._download_and_prepare = lambda *args: built.append(1) or original(*args)
print('asking', flush=True)
config = data.default_data_config()
config.name, config.data_dir = {name!r}, {data_dir!r}
builder = data.get_builder(config)
print('built it' if built else 'waited', builder.is_prepared(), flush=True)
"""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  os.makedirs(data_dir)
  with open(source.prepare_lock_path(data_dir, name), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # this process is "the first": it prepares while holding it
    output = []
    for line in child.stdout:
      output.append(line)
      if line.startswith('asking'):
        break
    assert output and output[-1].startswith('asking'), ''.join(output)
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
  rest = child.communicate(timeout=600)[0]
  assert child.returncode == 0, rest
  assert rest.strip().splitlines()[-1] == 'waited True', rest


@pytest.mark.parametrize('cache', [True, False])
def test_pipelines_are_traced_without_autograph(monkeypatch, cache):
  """jtl's map functions are straight-line TF, so AutoGraph's source rewrite (about 1 s of a run's
  start-up) is skipped: no jtl map function of a train or eval pipeline goes through `converted_call`
  (TFDS's readers still do: the patch sees those, so it is in the path)."""
  from tensorflow.python.autograph.impl import api as autograph_api
  converted = []
  original = autograph_api.converted_call
  monkeypatch.setattr(autograph_api, 'converted_call',
                      lambda f, *args, **kwargs: converted.append(f) or original(f, *args, **kwargs))
  pipeline._LOAD_CACHE.clear()
  c = _config(cache=cache, augment=True, crop_padding=1, flip=True, image_size=12)
  batch = next(data.train_iterator(c, global_batch_size=16, seed=0))
  factory, _ = data.eval_iterator(c, global_batch_size=16)
  assert batch['image'].shape == (16, 12, 12, 1) and next(factory())['image'].shape[0] == 16
  ours = [f for f in converted
          if getattr(getattr(f, 'func', f), '__module__', '').startswith('jtl')]  # (not TFDS's)
  assert converted and not ours, [getattr(f, '__qualname__', f) for f in ours]
